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

/// Clock skew allowed between the token issuer and this server, in seconds: `exp` may
/// be this far in the past, `nbf` and `iat` this far in the future.
pub const CLOCK_SKEW_LEEWAY_SECS: u64 = 30;

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
    /// Not valid before, unix seconds (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, unix seconds (optional; a token issued in the future is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
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
    /// `nbf` or `iat` is later than now (beyond the leeway).
    NotYetValid,
    BadIds,
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => ApiError::Unauthenticated("missing token"),
            AuthError::Malformed => ApiError::Unauthenticated("malformed token"),
            AuthError::BadSignature => ApiError::Unauthenticated("bad token signature"),
            AuthError::Expired => ApiError::Unauthenticated("token expired"),
            AuthError::NotYetValid => ApiError::Unauthenticated("token not yet valid"),
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
        validation.leeway = CLOCK_SKEW_LEEWAY_SECS;
        validation.validate_nbf = true;
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
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Malformed,
            })?;
        let c = data.claims;
        // jsonwebtoken does not look at `iat`.
        let now = jsonwebtoken::get_current_timestamp();
        if c.iat
            .is_some_and(|iat| iat > now.saturating_add(CLOCK_SKEW_LEEWAY_SECS))
        {
            return Err(AuthError::NotYetValid);
        }
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
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: user.to_string(),
        did: device.to_string(),
        dty: device_type.to_string(),
        exp: now + ttl_secs,
        nbf: None,
        iat: Some(now),
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

    fn token(exp: i64, nbf: Option<i64>, iat: Option<i64>) -> String {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let claims = Claims {
            sub: "a".into(),
            did: "d".into(),
            dty: "web".into(),
            exp: (now + exp) as u64,
            nbf: nbf.map(|n| (now + n) as u64),
            iat: iat.map(|n| (now + n) as u64),
            adm: false,
        };
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap()
    }

    #[test]
    fn expired() {
        let leeway = CLOCK_SKEW_LEEWAY_SECS as i64;
        let v = Verifier::new(b"k");
        assert_eq!(
            v.verify(&token(-leeway - 10, None, None)),
            Err(AuthError::Expired)
        );
        assert!(
            v.verify(&token(-leeway + 10, None, None)).is_ok(),
            "within the leeway"
        );
    }

    #[test]
    fn not_before_and_issued_at() {
        let leeway = CLOCK_SKEW_LEEWAY_SECS as i64;
        let v = Verifier::new(b"k");
        assert_eq!(
            v.verify(&token(7200, Some(3600), None)),
            Err(AuthError::NotYetValid)
        );
        assert_eq!(
            v.verify(&token(7200, None, Some(3600))),
            Err(AuthError::NotYetValid)
        );
        assert_eq!(
            v.verify(&token(7200, None, Some(leeway + 5))),
            Err(AuthError::NotYetValid)
        );
        assert_eq!(
            ApiError::from(AuthError::NotYetValid),
            ApiError::Unauthenticated("token not yet valid")
        );
        for ok in [
            token(3600, Some(-10), Some(-10)),
            token(3600, Some(leeway - 5), Some(leeway - 5)),
            token(3600, None, None),
        ] {
            assert!(v.verify(&ok).is_ok());
        }
        // A minted token carries iat = now and no nbf.
        let minted = mint(b"k", "a", "d", "web", false, 60).unwrap();
        let c = v.verify(&minted).unwrap();
        assert!(c.iat.is_some() && c.nbf.is_none());
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
