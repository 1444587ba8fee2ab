//! The browser chat page at `/demo` (when `demo` is on): three static files compiled
//! into the binary, plain JavaScript speaking the `imshard.v1.json` subprotocol
//! ([`crate::proto::json`]). No build step, nothing fetched from elsewhere.

use crate::proto::http;

/// The page's files: (path, content type, content).
const FILES: [(&str, &str, &str); 3] = [
    (
        "/demo",
        "text/html; charset=utf-8",
        include_str!("demo/index.html"),
    ),
    (
        "/demo/app.js",
        "text/javascript; charset=utf-8",
        include_str!("demo/app.js"),
    ),
    (
        "/demo/style.css",
        "text/css; charset=utf-8",
        include_str!("demo/style.css"),
    ),
];

/// The file at `path` (`/demo/` is the page too), or None.
pub fn file(path: &str) -> Option<(&'static str, &'static str)> {
    let path = if path == "/demo/" { "/demo" } else { path };
    FILES
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, ty, body)| (*ty, *body))
}

/// The HTTP answer for a GET of a path starting with `/demo` (404 when it is not one
/// of the page's files).
pub fn serve(path: &str, keep_alive: bool) -> Vec<u8> {
    match file(path) {
        Some((ty, body)) => http::response(200, ty, body.as_bytes(), keep_alive),
        None => http::json_err(
            &crate::codes::ApiError::NotFound("no such path"),
            keep_alive,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files() {
        assert!(
            file("/demo").is_some_and(|(t, b)| t.starts_with("text/html") && b.contains("app.js"))
        );
        assert_eq!(file("/demo/"), file("/demo"));
        assert!(file("/demo/app.js").is_some());
        assert!(file("/demo/nope").is_none());
        assert!(file("/demox").is_none());
    }
}
