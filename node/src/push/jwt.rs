//! JSON Web Tokens the push providers ask for: ES256 (APNs provider tokens, signed with the
//! team's `.p8` key) and RS256 (the FCM service account's OAuth2 assertion). Keys are PKCS#8
//! PEM; signing is `ring`'s.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};

/// Why a key could not be loaded or a token signed.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("no PKCS#8 private key in the PEM")]
    NoKey,
    #[error("the key was refused: {0}")]
    Rejected(String),
    #[error("signing failed")]
    Sign,
}

/// The DER of the first PKCS#8 `PRIVATE KEY` block of `pem`.
fn pkcs8_der(pem: &[u8]) -> Result<Vec<u8>, JwtError> {
    let mut reader = pem;
    for item in rustls_pemfile::read_all(&mut reader) {
        if let Ok(rustls_pemfile::Item::Pkcs8Key(key)) = item {
            return Ok(key.secret_pkcs8_der().to_vec());
        }
    }
    Err(JwtError::NoKey)
}

fn signing_input(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// Signs APNs provider tokens: ES256 over P-256 (`ECDSA_P256_SHA256_FIXED_SIGNING`).
pub struct Es256Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Es256Signer {
    pub fn from_pem(pem: &[u8]) -> Result<Es256Signer, JwtError> {
        let rng = SystemRandom::new();
        let der = pkcs8_der(pem)?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
            .map_err(|e| JwtError::Rejected(e.to_string()))?;
        Ok(Es256Signer { key, rng })
    }

    /// `{"alg":"ES256","kid":key_id}.{"iss":team_id,"iat":iat_s}`, signed.
    pub fn provider_token(
        &self,
        key_id: &str,
        team_id: &str,
        iat_s: u64,
    ) -> Result<String, JwtError> {
        let input = signing_input(
            &serde_json::json!({"alg": "ES256", "kid": key_id}),
            &serde_json::json!({"iss": team_id, "iat": iat_s}),
        );
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| JwtError::Sign)?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }
}

/// Signs OAuth2 JWT-bearer assertions: RS256 (RSASSA-PKCS1-v1_5 with SHA-256).
pub struct Rs256Signer {
    key: RsaKeyPair,
    rng: SystemRandom,
}

impl Rs256Signer {
    pub fn from_pem(pem: &[u8]) -> Result<Rs256Signer, JwtError> {
        let der = pkcs8_der(pem)?;
        let key = RsaKeyPair::from_pkcs8(&der).map_err(|e| JwtError::Rejected(e.to_string()))?;
        Ok(Rs256Signer {
            key,
            rng: SystemRandom::new(),
        })
    }

    /// `{"alg":"RS256","typ":"JWT"}.claims`, signed.
    pub fn assertion(&self, claims: &serde_json::Value) -> Result<String, JwtError> {
        let input = signing_input(&serde_json::json!({"alg": "RS256", "typ": "JWT"}), claims);
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, input.as_bytes(), &mut sig)
            .map_err(|_| JwtError::Sign)?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

/// Splits a compact JWT into its decoded header and claims and the signed input, for checks
/// (tests, and the stand-in providers of the integration tests).
pub fn decode_unverified(
    jwt: &str,
) -> Option<(serde_json::Value, serde_json::Value, String, Vec<u8>)> {
    let mut parts = jwt.split('.');
    let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
    let claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
    let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
    Some((header, claims, format!("{h}.{c}"), sig))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    #[test]
    fn es256_tokens_verify_with_the_public_key() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let signer = Es256Signer::from_pem(key.serialize_pem().as_bytes()).unwrap();
        let jwt = signer
            .provider_token("KEY123", "TEAM42", 1_700_000_000)
            .unwrap();
        let (header, claims, input, sig) = decode_unverified(&jwt).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], "KEY123");
        assert_eq!(claims["iss"], "TEAM42");
        assert_eq!(claims["iat"], 1_700_000_000u64);
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_key_raw())
            .verify(input.as_bytes(), &sig)
            .unwrap();
    }

    #[test]
    fn keys_that_are_not_pkcs8_are_refused() {
        assert!(matches!(
            Es256Signer::from_pem(b"not a key"),
            Err(JwtError::NoKey)
        ));
        assert!(Rs256Signer::from_pem(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        .is_err());
    }
}
