//! Tokens: minted by the managed-identity endpoint (App Service protocol), checked on every
//! ARM and Key Vault request the way Azure does: a missing, expired or wrong-audience token
//! is a 401.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// The audiences the sandbox serves.
pub const ARM_AUDIENCE: &str = "https://management.azure.com";

/// Who the sandbox's caller is.
#[derive(Debug, Clone)]
pub struct Caller {
    pub object_id: String,
    pub tenant_id: String,
}

/// Mints JWT-shaped tokens and recognises its own.
#[derive(Debug, Clone)]
pub struct TokenIssuer {
    /// Stands in for the signature: a token not minted by this sandbox is refused.
    signature: String,
    pub caller: Caller,
    /// Lifetime of minted tokens, in seconds.
    pub lifetime_s: i64,
}

/// Why a request's token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("Authentication failed. The 'Authorization' header is missing.")]
    Missing,
    #[error("The access token is invalid.")]
    Malformed,
    #[error("The access token has expired.")]
    Expired,
    #[error("The access token has an invalid audience '{found}'; expected '{expected}'.")]
    WrongAudience { found: String, expected: String },
}

impl TokenIssuer {
    pub fn new(caller: Caller) -> TokenIssuer {
        TokenIssuer {
            signature: URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes()),
            caller,
            lifetime_s: 3600,
        }
    }

    /// A token for `resource` (an AAD v1 resource such as `https://management.azure.com`).
    pub fn mint(&self, resource: &str, now: i64) -> (String, i64) {
        let expires_on = now + self.lifetime_s;
        let header = json!({"typ": "JWT", "alg": "RS256", "kid": "kmsflow-sandbox"});
        let payload = json!({
            "aud": resource.trim_end_matches('/'),
            "iss": format!("https://sts.windows.net/{}/", self.caller.tenant_id),
            "oid": self.caller.object_id,
            "tid": self.caller.tenant_id,
            "idtyp": "app",
            "iat": now,
            "nbf": now,
            "exp": expires_on,
        });
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string()),
            self.signature
        );
        (token, expires_on)
    }

    /// Checks an `Authorization` header value against the audience a surface expects.
    pub fn check(
        &self,
        authorization: Option<&str>,
        audience: &str,
        now: i64,
    ) -> Result<Value, TokenError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or(TokenError::Missing)?;
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if signature != self.signature {
            return Err(TokenError::Malformed);
        }
        let claims: Value = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(TokenError::Malformed)?;
        if claims["exp"].as_i64().is_none_or(|exp| exp <= now) {
            return Err(TokenError::Expired);
        }
        let found = claims["aud"].as_str().unwrap_or_default();
        if found.trim_end_matches('/') != audience {
            return Err(TokenError::WrongAudience {
                found: found.to_owned(),
                expected: audience.to_owned(),
            });
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(Caller {
            object_id: "oid".into(),
            tenant_id: "tid".into(),
        })
    }

    #[test]
    fn minted_tokens_pass_for_their_audience_only() {
        let issuer = issuer();
        let (token, _) = issuer.mint("https://management.azure.com/", 1000);
        let header = format!("Bearer {token}");
        let claims = issuer.check(Some(&header), ARM_AUDIENCE, 1001).unwrap();
        assert_eq!(claims["oid"], "oid");
        assert!(matches!(
            issuer.check(
                Some(&header),
                crate::addressing::PUBLIC_VAULT_AUDIENCE,
                1001
            ),
            Err(TokenError::WrongAudience { .. })
        ));
        assert_eq!(
            issuer.check(Some(&header), ARM_AUDIENCE, 1000 + 3600),
            Err(TokenError::Expired)
        );
        assert_eq!(
            issuer.check(None, ARM_AUDIENCE, 1001),
            Err(TokenError::Missing)
        );
        let forged = issuer_other_token();
        assert_eq!(
            issuer.check(Some(&forged), ARM_AUDIENCE, 1001),
            Err(TokenError::Malformed)
        );
    }

    fn issuer_other_token() -> String {
        let (token, _) = issuer().mint(ARM_AUDIENCE, 1000);
        format!("Bearer {token}")
    }
}
