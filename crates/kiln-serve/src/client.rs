//! A minimal HTTP/1.1 client for `kiln bench serve` and the tests: one request per connection
//! (`Connection: close`), raw bytes out, the status and the body back. Raw on purpose: the tests
//! send what no well-behaved client library would (cut bodies, lying lengths).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Sends `raw` (a whole request) and reads the answer to its end: the status and the body.
pub fn exchange(address: &str, raw: &[u8]) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    stream.write_all(raw)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no HTTP status in {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, body))
}

/// `method path` with `body` (JSON; empty for none).
pub fn request(address: &str, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, String)> {
    let head = format!("{method} {path} HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    exchange(address, &[head.as_bytes(), body].concat())
}
