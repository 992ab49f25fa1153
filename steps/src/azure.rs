//! The shared Azure context of the step kinds: the client is built on first use, so commands
//! that only compile runbooks (`validate`, `graph`, `docs`) never touch credentials.

use std::sync::Arc;

use kmsflow_engine::kind::StepError;
use tokio::sync::OnceCell;

use crate::client::{AzureClient, AzureConfig};

/// What the Azure step kinds share.
#[derive(Debug)]
pub struct Azure {
    config: AzureConfig,
    client: OnceCell<Arc<AzureClient>>,
}

impl Azure {
    pub fn new(config: AzureConfig) -> Arc<Azure> {
        Arc::new(Azure {
            config,
            client: OnceCell::new(),
        })
    }

    /// A context around an existing client (tests).
    pub fn with_client(client: AzureClient) -> Arc<Azure> {
        Arc::new(Azure {
            config: client.config().clone(),
            client: OnceCell::new_with(Some(Arc::new(client))),
        })
    }

    /// The client, built on first use.
    pub async fn client(&self) -> Result<Arc<AzureClient>, StepError> {
        self.client
            .get_or_try_init(|| async { AzureClient::new(self.config.clone()).map(Arc::new) })
            .await
            .cloned()
            .map_err(StepError::permanent)
    }

    /// Builds the client and fetches the ARM token now, so a fleet's first hundred checks
    /// do not all wait on them at once.
    pub async fn prepare(&self) -> Result<(), StepError> {
        self.client()
            .await?
            .warm_up()
            .await
            .map_err(StepError::from)
    }
}
