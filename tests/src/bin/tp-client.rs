//! A client with behaviour curl cannot show, run inside test cgroups:
//!
//! * `half-close ADDR TEXT`: sends TEXT, shuts down its write side, prints the whole answer.
//! * `bulk ADDR SEED LEN`: sends LEN bytes of `pattern(SEED)` while reading LEN bytes (or to
//!   end-of-file), then prints `sent <len> <sha256>` and `received <len> <sha256>`.
//! * `bulk-half-close ADDR SEED LEN`: the same, but shuts down its write side once it has sent
//!   everything, and reads to end-of-file.
//! * `peer ADDR`: connects and prints what `getpeername()` says.
//! * `echo-session ADDR`: keeps one connection open; sends each stdin line and prints the echo.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

use transproxy_tests::{pattern, read_up_to, sha256_hex};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tp-client: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let (mode, rest) = args
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("usage: tp-client MODE ADDR ..."))?;
    let addr: SocketAddr = rest
        .first()
        .ok_or_else(|| anyhow::anyhow!("missing ADDR"))?
        .parse()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    match mode.as_str() {
        "half-close" => {
            let text = rest.get(1).ok_or_else(|| anyhow::anyhow!("missing TEXT"))?;
            stream.write_all(text.as_bytes())?;
            stream.shutdown(Shutdown::Write)?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            print!("{answer}");
        }
        "bulk" | "bulk-half-close" => {
            let half_close = mode == "bulk-half-close";
            let seed: u64 = rest
                .get(1)
                .ok_or_else(|| anyhow::anyhow!("missing SEED"))?
                .parse()?;
            let len: usize = rest
                .get(2)
                .ok_or_else(|| anyhow::anyhow!("missing LEN"))?
                .parse()?;
            let mut writer = stream.try_clone()?;
            let sender = std::thread::spawn(move || -> std::io::Result<String> {
                let data = pattern(seed, len);
                writer.write_all(&data)?;
                if half_close {
                    writer.shutdown(Shutdown::Write)?;
                }
                Ok(sha256_hex(&data))
            });
            let received = if half_close {
                let mut all = Vec::new();
                stream.read_to_end(&mut all)?;
                all
            } else {
                read_up_to(&stream, len)
            };
            let sent = sender
                .join()
                .map_err(|_| anyhow::anyhow!("sender panicked"))??;
            println!("sent {len} {sent}");
            println!("received {} {}", received.len(), sha256_hex(&received));
        }
        "peer" => println!("{}", stream.peer_addr()?),
        "echo-session" => {
            let mut replies = std::io::BufReader::new(stream.try_clone()?);
            for line in std::io::stdin().lines() {
                stream.write_all(format!("{}\n", line?).as_bytes())?;
                let mut reply = String::new();
                if std::io::BufRead::read_line(&mut replies, &mut reply)? == 0 {
                    anyhow::bail!("connection closed");
                }
                print!("{reply}");
                std::io::stdout().flush()?;
            }
        }
        other => anyhow::bail!("unknown mode {other}"),
    }
    Ok(())
}
