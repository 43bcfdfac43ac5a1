//! Roles run as their own processes (`cdn edge`, `cdn control`): what they print.

use std::sync::{Arc, Mutex};

use tokio::{io::AsyncReadExt as _, process::Child};

/// Collects what `child` writes to its piped stdout and stderr, as it comes, into
/// one string (read it to show a process's log when a check fails).
pub fn capture_output(child: &mut Child) -> Arc<Mutex<String>> {
    let output = Arc::new(Mutex::new(String::new()));
    let streams: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ];
    for mut stream in streams.into_iter().flatten() {
        let output = output.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 8192];
            while let Ok(n) = stream.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                output
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
    }
    output
}
