//! `cdn-healthcheck`: the Docker HEALTHCHECK of the `cdn` images.
//!
//! Images built `FROM scratch` (deploy/build-image.sh) have no shell and no curl, so
//! this tiny std-only program does the one thing a health check needs:
//!
//! ```text
//! cdn-healthcheck [http://]HOST:PORT[/PATH]      # PATH defaults to /readyz
//! ```
//!
//! It exits 0 when the answer's status is 200 within two seconds, 1 otherwise, and
//! prints the status line (or the error) for `docker inspect`.
//! Built with plain `rustc` (no Cargo, no dependencies): see build-image.sh.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9090/readyz".into());
    let rest = arg.strip_prefix("http://").unwrap_or(&arg);
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/readyz"),
    };
    match check(host, path) {
        Ok(status) if status.split_whitespace().nth(1) == Some("200") => {
            println!("{status}");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{status}");
            ExitCode::FAILURE
        }
        Err(error) => {
            println!("http://{host}{path}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn check(host: &str, path: &str) -> std::io::Result<String> {
    let timeout = Duration::from_secs(2);
    let addr: SocketAddr = host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: cdn-healthcheck\r\n\r\n")?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    Ok(line.lines().next().unwrap_or("").trim().to_string())
}
