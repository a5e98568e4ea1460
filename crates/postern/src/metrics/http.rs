//! `GET /metrics` over plain HTTP/1.1 (see the module above for why by hand, and the
//! bounds: request size, time, connections at once).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::Metrics;
use crate::queue::Spool;

/// Request line and headers, at most.
const MAX_REQUEST: usize = 8 * 1024;
/// Reading the request, and separately writing the response, may take this long.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
const MAX_SCRAPES: usize = 16;
const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Answers scrapes on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    spool: Spool,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit: dropping the stream closes it.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let (metrics, spool) = (Arc::clone(&metrics), spool.clone());
        tokio::spawn(async move {
            let _ = answer(stream, &metrics, &spool).await;
            drop(slot);
        });
    }
}

/// One request, one response.
async fn answer(mut stream: TcpStream, metrics: &Metrics, spool: &Spool) -> io::Result<()> {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) | Ok(Err(_)) | Ok(Ok(Head::Closed)) => return Ok(()),
        Ok(Ok(Head::TooLarge)) => response("431 Request Header Fields Too Large", "text/plain", ""),
        Ok(Ok(Head::Complete(head))) => match route(&head) {
            Route::Metrics => response("200 OK", CONTENT_TYPE, &metrics.render(spool.sync_count())),
            Route::NotFound => response("404 Not Found", "text/plain", "not found\n"),
            Route::BadRequest => response("400 Bad Request", "text/plain", "bad request\n"),
        },
    };
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

enum Head {
    /// The request up to (not including) the empty line.
    Complete(Vec<u8>),
    TooLarge,
    /// The client closed before the end of the headers.
    Closed,
}

/// Reads until the empty line that ends the headers, within `MAX_REQUEST` octets.
async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        if let Some(end) = head_end(&buf[..len]) {
            buf.truncate(end);
            return Ok(Head::Complete(buf));
        }
        if len == buf.len() {
            return Ok(Head::TooLarge);
        }
        match stream.read(&mut buf[len..]).await? {
            0 => return Ok(Head::Closed),
            n => len += n,
        }
    }
}

/// Where the headers end: the first empty line (CRLF CRLF, or bare LFs).
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadRequest,
}

/// The request line decides: `GET /metrics HTTP/1.x` (a query string is ignored).
fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if method == "GET" && path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\nHost: x"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1"), Route::NotFound);
        assert_eq!(route(b"GET /metrics/x HTTP/1.1"), Route::NotFound);
        assert_eq!(route(b"GET /metrics"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SMTP/1.0"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe"), Route::BadRequest);
    }

    #[test]
    fn headers_end_at_the_first_empty_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(20));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }
}
