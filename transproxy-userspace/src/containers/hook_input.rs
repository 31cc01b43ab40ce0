//! What the runtimes' hooks read (`transproxy oci-hook`, `transproxy-cni`): an OCI container
//! state and a CNI network configuration, both JSON written by a container runtime. Kept apart
//! from the hooks themselves so the fuzz target reads them as the hooks do.

use anyhow::{Context as _, anyhow};

/// The `pid` of an OCI container state document.
pub fn oci_pid(state: &[u8]) -> anyhow::Result<u32> {
    let state: serde_json::Value =
        serde_json::from_slice(state).context("the container state on stdin is not JSON")?;
    let pid = state
        .get("pid")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| anyhow!("the container state on stdin has no pid"))?;
    u32::try_from(pid)
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or_else(|| anyhow!("the container state's pid {pid} is not a process id"))
}

/// What an `ADD` prints: the previous plugin's result, or an empty one of the config's version.
pub fn cni_result(config: &[u8]) -> anyhow::Result<serde_json::Value> {
    let config: serde_json::Value =
        serde_json::from_slice(config).context("the CNI network configuration is not JSON")?;
    let version = config
        .get("cniVersion")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| anyhow!("the CNI network configuration has no cniVersion"))?;
    Ok(match config.get("prevResult") {
        Some(previous) if previous.is_object() => previous.clone(),
        _ => serde_json::json!({ "cniVersion": version }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_container_pid_is_read_from_its_state() {
        let state =
            br#"{"ociVersion":"1.0.2","id":"abc","status":"created","pid":4242,"bundle":"/b"}"#;
        assert_eq!(oci_pid(state).unwrap(), 4242);
        for bad in [
            &b"{}"[..],
            b"[1]",
            b"{\"pid\":0}",
            b"{\"pid\":-1}",
            b"{\"pid\":99999999999}",
            b"not json",
        ] {
            assert!(oci_pid(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn cni_passes_the_previous_result_on() {
        let config = br#"{"cniVersion":"1.0.0","name":"k8s","type":"transproxy","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"}]}}"#;
        let result = cni_result(config).unwrap();
        assert_eq!(result["ips"][0]["address"], "10.1.0.5/24");
        let bare =
            cni_result(br#"{"cniVersion":"0.4.0","name":"k8s","type":"transproxy"}"#).unwrap();
        assert_eq!(bare, serde_json::json!({"cniVersion": "0.4.0"}));
        assert!(cni_result(br#"{"name":"k8s"}"#).is_err());
    }
}
