//! The `Idempotency-Key` request header: a client that retries a create with the same key and
//! body gets the first result back instead of a second job.

use axum::http::{HeaderMap, HeaderName};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Set to `true` on a response that returns the result of an earlier request with the same key.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The maximum length of a key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// Reads the optional `Idempotency-Key` header: 1 to 255 printable ASCII characters
/// (space to `~`), sent at most once.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(invalid_key(
            "the request has more than one Idempotency-Key header; send one".into(),
        ));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY_BYTES {
        return Err(invalid_key(format!(
            "the Idempotency-Key header is {} bytes long; send 1 to {MAX_KEY_BYTES} printable ASCII characters, such as a UUID",
            bytes.len()
        )));
    }
    if let Some(position) = bytes.iter().position(|byte| !(b' '..=b'~').contains(byte)) {
        return Err(invalid_key(format!(
            "the Idempotency-Key header has the byte 0x{:02x} at position {position}, which is not printable ASCII; send 1 to {MAX_KEY_BYTES} printable ASCII characters, such as a UUID",
            bytes[position]
        )));
    }
    // Every byte is printable ASCII, so this is valid UTF-8.
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

fn invalid_key(message: String) -> ApiError {
    ApiError::invalid(message, None, "invalid_idempotency_key")
}

/// Returns the lowercase hex SHA-256 of `body` in canonical form: object keys sorted, no
/// whitespace. Two bodies that differ only in key order or spacing get the same hash.
pub fn request_hash(body: &Value) -> String {
    let mut canonical = String::new();
    write_canonical(body, &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (index, (key, value)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use serde_json::json;

    use super::*;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(IDEMPOTENCY_KEY, HeaderValue::from_bytes(value).unwrap());
        }
        headers
    }

    fn rejection_message(result: Result<Option<String>, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidRequest { message, code, .. }) => {
                assert_eq!(code, Some("invalid_idempotency_key"));
                message
            }
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn key_is_optional() {
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn printable_key_is_accepted() {
        let key = "retry 7: ~!@#$%^&*()_+";
        assert_eq!(
            idempotency_key(&headers(&[key.as_bytes()]))
                .unwrap()
                .as_deref(),
            Some(key)
        );
        let longest = "k".repeat(MAX_KEY_BYTES);
        assert_eq!(
            idempotency_key(&headers(&[longest.as_bytes()])).unwrap(),
            Some(longest)
        );
    }

    #[test]
    fn empty_or_long_key_is_rejected() {
        let empty = rejection_message(idempotency_key(&headers(&[b""])));
        let long = rejection_message(idempotency_key(&headers(&["k".repeat(256).as_bytes()])));

        assert!(empty.contains("0 bytes long"), "{empty}");
        assert!(long.contains("256 bytes long"), "{long}");
    }

    #[test]
    fn non_ascii_key_is_rejected() {
        let message = rejection_message(idempotency_key(&headers(&["clé".as_bytes()])));
        let tab = rejection_message(idempotency_key(&headers(&[b"a\tb"])));

        assert!(message.contains("0xc3 at position 2"), "{message}");
        assert!(tab.contains("0x09 at position 1"), "{tab}");
    }

    #[test]
    fn repeated_header_is_rejected() {
        let message = rejection_message(idempotency_key(&headers(&[b"a", b"b"])));
        assert!(message.contains("more than one"), "{message}");
    }

    #[test]
    fn hash_ignores_key_order_and_spacing() {
        let first: Value = serde_json::from_str(
            r#"{"model": "tiny", "method": {"type": "supervised", "n": [1, 2]}}"#,
        )
        .unwrap();
        let second: Value =
            serde_json::from_str(r#"{"method":{"n":[1,2],"type":"supervised"},"model":"tiny"}"#)
                .unwrap();

        assert_eq!(request_hash(&first), request_hash(&second));
        assert_eq!(request_hash(&first).len(), 64);
    }

    #[test]
    fn hash_tells_bodies_apart() {
        let base = json!({"model": "tiny", "seed": 1});
        for other in [
            json!({"model": "tiny", "seed": 2}),
            json!({"model": "tiny"}),
            json!({"model": "tiny", "seed": [1]}),
            json!({"model": "tiny", "seed": "1"}),
        ] {
            assert_ne!(request_hash(&base), request_hash(&other), "{other}");
        }
    }
}
