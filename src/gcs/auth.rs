//! Credentials (placeholder until the ADC implementation lands): anonymous only.

use std::path::PathBuf;

/// Where credentials come from.
#[derive(Debug, Clone)]
pub enum CredentialsSource {
    /// No credentials: no authorization header (emulator, public buckets).
    Anonymous,
    /// Application Default Credentials.
    Adc,
    /// A service account (or other ADC-format) JSON key file.
    KeyFile(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("credentials are not supported yet: {0}")]
    Unsupported(String),
}

/// Cheap to clone; shared by every call.
#[derive(Clone, Debug)]
pub struct TokenProvider;

impl TokenProvider {
    pub async fn new(source: CredentialsSource) -> Result<TokenProvider, AuthError> {
        match source {
            CredentialsSource::Anonymous => Ok(TokenProvider),
            other => Err(AuthError::Unsupported(format!("{other:?}"))),
        }
    }

    pub async fn authorization(
        &self,
    ) -> Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>, AuthError> {
        Ok(None)
    }

    pub fn is_anonymous(&self) -> bool {
        true
    }
}
