//! `deploy/kubernetes/` checked offline (no cluster runs here): every document is read into the
//! Kubernetes API type of its kind (k8s-openapi, generated from the API's own OpenAPI schemas)
//! and written back; a field the type does not have, or one of the wrong type, or a missing
//! required one, fails. Then what transproxy needs of each is checked: the DaemonSet's host
//! namespaces, mounts and capabilities, and the ConfigMap's config file, read as the daemon
//! reads one.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, Secret},
};
use serde::de::DeserializeOwned;
use transproxy_tests::workspace::root;

/// Every manifest's documents, as JSON values.
fn documents() -> Vec<(PathBuf, serde_json::Value)> {
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let mut documents = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("manifest");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|err| panic!("{}: not YAML: {err}", file.display()));
            let json = serde_json::to_value(value).expect("YAML as JSON");
            documents.push((file.clone(), json));
        }
    }
    documents
}

use serde::Deserialize as _;

/// `value` read as `T` and written back: the same document, or the first difference is shown.
fn strictly<T: DeserializeOwned + serde::Serialize>(file: &Path, value: &serde_json::Value) -> T {
    let typed: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|err| panic!("{}: {err}", file.display()));
    let back = serde_json::to_value(&typed).expect("serialises");
    if let Some(at) = first_difference(value, &back, String::new()) {
        panic!(
            "{}: {at} is not a field of the Kubernetes type (or not written as it writes it)",
            file.display()
        );
    }
    typed
}

/// The path of the first place where `written` and `read_back` differ.
fn first_difference(
    written: &serde_json::Value,
    read_back: &serde_json::Value,
    at: String,
) -> Option<String> {
    use serde_json::Value;
    match (written, read_back) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .find_map(|(key, value)| match b.get(key) {
                Some(other) => first_difference(value, other, format!("{at}.{key}")),
                None => Some(format!("{at}.{key}")),
            })
            .or_else(|| {
                b.keys()
                    .find(|key| !a.contains_key(*key))
                    .map(|key| format!("{at}.{key} (added)"))
            }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, format!("{at}[{i}]"))),
        _ => (written != read_back).then_some(at),
    }
}

#[test]
fn every_manifest_is_a_valid_kubernetes_object() {
    let mut kinds = BTreeSet::new();
    for (file, document) in documents() {
        let kind = document["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "Namespace" => drop(strictly::<Namespace>(&file, &document)),
            "Secret" => drop(strictly::<Secret>(&file, &document)),
            "ConfigMap" => drop(strictly::<ConfigMap>(&file, &document)),
            "DaemonSet" => drop(strictly::<DaemonSet>(&file, &document)),
            other => panic!(
                "{}: a kind this test does not know: {other:?}",
                file.display()
            ),
        }
        kinds.insert(kind);
    }
    assert_eq!(
        kinds,
        BTreeSet::from(["ConfigMap", "DaemonSet", "Namespace", "Secret"].map(String::from))
    );
}

/// The kind's one document.
fn the<T: DeserializeOwned + serde::Serialize>(kind: &str) -> T {
    let found: Vec<_> = documents()
        .into_iter()
        .filter(|(_, d)| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    strictly(&found[0].0, &found[0].1)
}

#[test]
fn the_daemonset_has_what_the_daemon_needs_and_no_more() {
    let daemonset: DaemonSet = the("DaemonSet");
    let spec = daemonset.spec.expect("spec");
    let template = spec.template;
    let labels = template.metadata.as_ref().and_then(|m| m.labels.clone());
    assert_eq!(
        spec.selector.match_labels, labels,
        "the selector picks the pods"
    );
    let annotations = template
        .metadata
        .and_then(|m| m.annotations)
        .expect("annotations");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    let pod = template.spec.expect("pod spec");
    assert_eq!(
        pod.host_pid,
        Some(true),
        "it serves pods' namespaces through /proc"
    );
    assert_eq!(pod.host_network, Some(true), "tunnels leave from the node");
    assert_eq!(pod.automount_service_account_token, Some(false));
    let daemon = &pod.containers[0];
    let context = daemon.security_context.as_ref().expect("security context");
    assert_eq!(context.privileged, Some(false));
    let capabilities = context.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    // The systemd unit's bounding set less the user switch (the pod runs as root).
    assert_eq!(
        added,
        BTreeSet::from([
            "BPF",
            "NET_ADMIN",
            "PERFMON",
            "SETPCAP",
            "SYS_ADMIN",
            "SYS_PTRACE"
        ])
    );
    let probe = daemon.liveness_probe.as_ref().and_then(|p| p.exec.as_ref());
    let command = probe
        .and_then(|e| e.command.clone())
        .expect("liveness command");
    assert_eq!(command[1..], ["status", "--check"]);
    let port = daemon
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"));
    let port = port.expect("metrics port").container_port.to_string();
    assert_eq!(annotations["prometheus.io/port"], port);
    let mounts: BTreeSet<&str> = daemon
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    for needed in [
        "/sys/fs/cgroup",
        "/sys/fs/bpf",
        "/run/transproxy",
        "/etc/transproxy",
    ] {
        assert!(
            mounts.contains(needed),
            "{needed} is not mounted: {mounts:?}"
        );
    }
}

#[test]
fn the_configmaps_config_is_one_the_daemon_reads() {
    let config: ConfigMap = the("ConfigMap");
    let data = config.data.expect("data");
    let text = &data["transproxy.toml"];
    transproxy::config::check_text(text).expect("the daemon reads it");
    assert!(
        text.contains("cgroup = \"/sys/fs/cgroup/kubepods.slice\""),
        "{text}"
    );
    let secret: Secret = the("Secret");
    let key = secret
        .string_data
        .expect("stringData")
        .into_keys()
        .next()
        .expect("a key");
    assert!(
        text.contains(&format!(
            "proxy-auth-file = \"/etc/transproxy/secret/{key}\""
        )),
        "{text}"
    );
}
