//! Keeping the webhook configurations' `caBundle` equal to the trust domain's CA: patched at
//! start, and again whenever a configuration changes (a `helm upgrade` re-applies it with an
//! empty bundle), so the API server always trusts the certificate the webhook serves.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures_util::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};

/// The field manager of every caBundle patch.
pub const FIELD_MANAGER: &str = "ringfence-webhook";
/// Even with no change seen, the bundle is re-checked this often (a missed watch event costs at
/// most this long of refused admissions).
const RECHECK: Duration = Duration::from_secs(300);

/// Why a caBundle could not be patched.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot {action} {kind} {name}: {source}; check that it exists and the operator's ClusterRole allows get and patch on it"
)]
pub struct CaBundleError {
    action: &'static str,
    kind: &'static str,
    name: String,
    #[source]
    source: Box<kube::Error>,
}

/// How many webhooks one [`ensure`] patched, per configuration kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Patched {
    pub mutating: usize,
    pub validating: usize,
}

/// Sets `caBundle` to `ca_pem` on every webhook of the mutating and validating configurations
/// named `name` whose bundle differs; patches nothing when all are current. A configuration that
/// does not exist is skipped with a warning (the chart creates both).
pub async fn ensure(
    client: &kube::Client,
    name: &str,
    ca_pem: &str,
) -> Result<Patched, CaBundleError> {
    let want = ByteString(ca_pem.as_bytes().to_vec());
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let m = match get(&mutating, "MutatingWebhookConfiguration", name).await? {
        Some(c) => stale(
            c.webhooks
                .iter()
                .flatten()
                .map(|w| (&w.name, &w.client_config)),
            &want,
        ),
        None => Vec::new(),
    };
    patch(&mutating, "MutatingWebhookConfiguration", name, &m, &want).await?;
    let v = match get(&validating, "ValidatingWebhookConfiguration", name).await? {
        Some(c) => stale(
            c.webhooks
                .iter()
                .flatten()
                .map(|w| (&w.name, &w.client_config)),
            &want,
        ),
        None => Vec::new(),
    };
    patch(
        &validating,
        "ValidatingWebhookConfiguration",
        name,
        &v,
        &want,
    )
    .await?;
    Ok(Patched {
        mutating: m.len(),
        validating: v.len(),
    })
}

/// Runs [`ensure`] now, on every change to either configuration, and every few minutes, until
/// `shutdown`. Failures are logged and retried on the next trigger.
pub async fn keep(
    client: kube::Client,
    name: String,
    ca_pem: String,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let by_name = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mutating = watcher(
        Api::<MutatingWebhookConfiguration>::all(client.clone()),
        by_name.clone(),
    )
    .default_backoff()
    .map(|e| e.is_ok());
    let validating = watcher(
        Api::<ValidatingWebhookConfiguration>::all(client.clone()),
        by_name,
    )
    .default_backoff()
    .map(|e| e.is_ok());
    let changes = futures_util::stream::select(mutating, validating);
    tokio::pin!(changes);
    let mut recheck = tokio::time::interval(RECHECK);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = recheck.tick() => {}
            Some(_) = changes.next() => {}
        }
        match ensure(&client, &name, &ca_pem).await {
            Ok(p) if p != Patched::default() => {
                tracing::info!(mutating = p.mutating, validating = p.validating, %name, "patched the webhooks' caBundle");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "keeping the webhooks' caBundle current failed"),
        }
    }
}

fn stale<'a>(
    webhooks: impl Iterator<Item = (&'a String, &'a WebhookClientConfig)>,
    want: &ByteString,
) -> Vec<String> {
    webhooks
        .filter(|(_, cc)| cc.ca_bundle.as_ref() != Some(want))
        .map(|(name, _)| name.clone())
        .collect()
}

async fn get<K>(api: &Api<K>, kind: &'static str, name: &str) -> Result<Option<K>, CaBundleError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let found = api.get_opt(name).await.map_err(|e| CaBundleError {
        action: "read",
        kind,
        name: name.to_owned(),
        source: Box::new(e),
    })?;
    if found.is_none() {
        tracing::warn!(%kind, %name, "no such webhook configuration; the API server will not call this webhook");
    }
    Ok(found)
}

async fn patch<K>(
    api: &Api<K>,
    kind: &'static str,
    name: &str,
    webhooks: &[String],
    want: &ByteString,
) -> Result<(), CaBundleError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if webhooks.is_empty() {
        return Ok(());
    }
    // Strategic merge: `webhooks` merges by name, so only the bundles change.
    let body = serde_json::json!({
        "webhooks": webhooks.iter().map(|w| serde_json::json!({
            "name": w,
            "clientConfig": {"caBundle": STANDARD.encode(&want.0)},
        })).collect::<Vec<_>>()
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    api.patch(name, &params, &Patch::Strategic(body))
        .await
        .map_err(|e| CaBundleError {
            action: "patch",
            kind,
            name: name.to_owned(),
            source: Box::new(e),
        })?;
    Ok(())
}
