//! A pass-through proxy to moto on a loopback port, for the tests that must see, hold or
//! change single requests (the throttle proxy of `scripts/services` counts, limits and holds
//! by action; this one runs a test's own closures).

use std::sync::Arc;

/// What the test proxy does with one request.
pub enum Verdict {
    /// Pass it to moto and its answer back (through the rewrite).
    Forward,
    /// Never answer (the client waits until it is killed).
    Hold,
}

pub type Decide = dyn Fn(&[u8]) -> Verdict + Send + Sync;
pub type Rewrite = dyn Fn(&[u8], Vec<u8>) -> Vec<u8> + Send + Sync;

/// A pass-through to moto on a loopback port: `decide` sees each request body first, `rewrite`
/// gets the request body and moto's whole answer and returns what the client gets. Returns
/// the proxy's URL.
pub fn proxy(upstream: &str, decide: Arc<Decide>, rewrite: Arc<Rewrite>) -> String {
    use std::io::{BufRead, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let upstream = upstream
        .trim_end_matches('/')
        .trim_start_matches("http://")
        .to_owned();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let upstream = upstream.clone();
            let decide = decide.clone();
            let rewrite = rewrite.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut reader = std::io::BufReader::new(stream.try_clone()?);
                let mut writer = stream;
                loop {
                    let mut head = String::new();
                    if reader.read_line(&mut head)? == 0 {
                        return Ok(());
                    }
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line)?;
                        let trimmed = line.trim_end();
                        if trimmed.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = trimmed.split_once(':') {
                            if k.trim().eq_ignore_ascii_case("content-length") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                            // moto answers one request per connection; the client reconnects.
                            if k.trim().eq_ignore_ascii_case("connection") {
                                continue;
                            }
                        }
                        head.push_str(&line);
                    }
                    head.push_str("Connection: close\r\n\r\n");
                    let mut body = vec![0u8; length];
                    reader.read_exact(&mut body)?;
                    if let Verdict::Hold = decide(&body) {
                        let mut rest = [0u8; 1];
                        while reader.read(&mut rest)? > 0 {}
                        return Ok(());
                    }
                    let mut moto = std::net::TcpStream::connect(&upstream)?;
                    moto.write_all(head.as_bytes())?;
                    moto.write_all(&body)?;
                    let mut response = Vec::new();
                    moto.read_to_end(&mut response)?;
                    writer.write_all(&rewrite(&body, response))?;
                    writer.flush()?;
                }
            });
        }
    });
    address
}
