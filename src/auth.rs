//! JWT (HS256) authentication of docs/PROTOCOL.md: claims, verification, minting, and the
//! server secret (given, or generated once into `<data-dir>/jwt.secret`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::codes::ApiError;
use crate::ids::is_valid_id;

/// Device types a token may name; anything else is refused.
pub const DEVICE_TYPES: [&str; 4] = ["mobile", "desktop", "web", "pad"];

/// The claims imshard reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// User uuid.
    pub sub: String,
    /// Device id.
    pub did: String,
    /// Device type; `web` when absent.
    #[serde(default = "default_dty")]
    pub dty: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Admin calls need `true`.
    #[serde(default)]
    pub adm: bool,
}

fn default_dty() -> String {
    "web".to_string()
}

/// Why a token was refused. Every variant is HTTP 401 / code 40101 except a token whose
/// ids are not protocol ids, which is 40001.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Malformed,
    BadSignature,
    Expired,
    BadIds,
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => ApiError::Unauthenticated("missing token"),
            AuthError::Malformed => ApiError::Unauthenticated("malformed token"),
            AuthError::BadSignature => ApiError::Unauthenticated("bad token signature"),
            AuthError::Expired => ApiError::Unauthenticated("token expired"),
            AuthError::BadIds => ApiError::invalid(
                "token sub/did must be 1-64 chars of [A-Za-z0-9_.@], dty one of mobile|desktop|web|pad",
            ),
        }
    }
}

/// Verifies tokens with one secret. Cheap to clone (keys are small).
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data =
            decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Malformed,
            })?;
        let c = data.claims;
        if !is_valid_id(&c.sub) || !is_valid_id(&c.did) || !DEVICE_TYPES.contains(&c.dty.as_str()) {
            return Err(AuthError::BadIds);
        }
        Ok(c)
    }
}

/// Signs a token for `user` / `device` valid for `ttl_secs` from now.
pub fn mint(
    secret: &[u8],
    user: &str,
    device: &str,
    device_type: &str,
    admin: bool,
    ttl_secs: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let claims = Claims {
        sub: user.to_string(),
        did: device.to_string(),
        dty: device_type.to_string(),
        exp: jsonwebtoken::get_current_timestamp() + ttl_secs,
        adm: admin,
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

/// Where the secret came from, for the start-up log.
#[derive(Debug, PartialEq, Eq)]
pub enum SecretSource {
    Configured,
    File,
    Generated,
}

/// Returns the configured secret, else the one in `<data_dir>/jwt.secret`, else makes a
/// random one and writes it there with mode 0600.
pub fn load_or_create_secret(
    configured: Option<&str>,
    data_dir: &Path,
    create: bool,
) -> std::io::Result<(Vec<u8>, SecretSource)> {
    if let Some(s) = configured {
        return Ok((s.as_bytes().to_vec(), SecretSource::Configured));
    }
    let path = data_dir.join("jwt.secret");
    match fs::read_to_string(&path) {
        Ok(s) => {
            let s = s.trim();
            if s.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is empty", path.display()),
                ));
            }
            return Ok((s.as_bytes().to_vec(), SecretSource::File));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {}
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "cannot read {}: {e} (give --jwt-secret or start the server once)",
                    path.display()
                ),
            ))
        }
    }
    fs::create_dir_all(data_dir)?;
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(hex.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok((hex.into_bytes(), SecretSource::Generated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_and_verify() {
        let t = mint(b"s3cret", "alice", "phone", "mobile", false, 60).unwrap();
        let c = Verifier::new(b"s3cret").verify(&t).unwrap();
        assert_eq!(
            (c.sub.as_str(), c.did.as_str(), c.adm),
            ("alice", "phone", false)
        );
        assert_eq!(
            Verifier::new(b"other").verify(&t),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            Verifier::new(b"s3cret").verify("abc.def"),
            Err(AuthError::Malformed)
        );
        let bad = mint(b"s3cret", "al-ice", "phone", "web", false, 60).unwrap();
        assert_eq!(
            Verifier::new(b"s3cret").verify(&bad),
            Err(AuthError::BadIds)
        );
    }

    #[test]
    fn expired() {
        let claims = Claims {
            sub: "a".into(),
            did: "d".into(),
            dty: "web".into(),
            exp: jsonwebtoken::get_current_timestamp() - 10,
            adm: false,
        };
        let t = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert_eq!(Verifier::new(b"k").verify(&t), Err(AuthError::Expired));
    }

    #[test]
    fn secret_file_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let (a, src) = load_or_create_secret(None, dir.path(), true).unwrap();
        assert_eq!(src, SecretSource::Generated);
        let (b, src) = load_or_create_secret(None, dir.path(), true).unwrap();
        assert_eq!((a, src), (b, SecretSource::File));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("jwt.secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
