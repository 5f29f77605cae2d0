//! The trust domain's CA in a Kubernetes Secret (`tls.crt`, `tls.key`): loaded when present —
//! one the chart generated earlier, or one supplied from elsewhere, e.g. cert-manager — and
//! generated and stored when absent. Every replica ends up with the same CA: when two create
//! it at once, the API server keeps the first and the other loads it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use ringfence_crds::TrustDomain;

use crate::identity::{Identity, IdentityError};

/// Why the CA Secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("cannot {action} the CA Secret {namespace}/{name}: {source}")]
    Api {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "the CA Secret {namespace}/{name} has no {key}: a CA Secret holds tls.crt and tls.key (PEM)"
    )]
    MissingKey {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("the CA Secret {namespace}/{name} key {key} is not UTF-8 PEM")]
    NotPem {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// The identity service over the CA in Secret `namespace/name`, creating the CA when absent.
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: TrustDomain,
    svid_ttl: Duration,
) -> Result<Identity, CaSecretError> {
    let api = Api::<Secret>::namespaced(client, namespace);
    let err = |action: &'static str| {
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        move |source| CaSecretError::Api {
            action,
            namespace,
            name,
            source: Box::new(source),
        }
    };
    let origin = format!("secret {namespace}/{name}");
    if let Some(secret) = api.get_opt(name).await.map_err(err("read"))? {
        return from_secret(&secret, namespace, name, &origin, trust_domain, svid_ttl);
    }
    let (identity, key_pem) = Identity::generate(trust_domain.clone(), &origin, svid_ttl)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "ringfence".to_owned(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".to_owned(),
                ByteString(identity.trust_bundle_pem().as_bytes().to_vec()),
            ),
            ("tls.key".to_owned(), ByteString(key_pem.into_bytes())),
        ])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), trust_domain = %trust_domain, "created the trust domain CA");
            Ok(identity)
        }
        // Another replica created it first: use theirs, so there is one CA.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = api.get(name).await.map_err(err("read"))?;
            from_secret(&secret, namespace, name, &origin, trust_domain, svid_ttl)
        }
        Err(e) => Err(err("create")(e)),
    }
}

fn from_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
    origin: &str,
    trust_domain: TrustDomain,
    svid_ttl: Duration,
) -> Result<Identity, CaSecretError> {
    let field = |key: &'static str| -> Result<String, CaSecretError> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| CaSecretError::MissingKey {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key,
            })?;
        String::from_utf8(bytes.0.clone()).map_err(|_| CaSecretError::NotPem {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            key,
        })
    };
    let (cert, key) = (field("tls.crt")?, field("tls.key")?);
    Ok(Identity::from_ca_pem(
        &key,
        &cert,
        origin,
        trust_domain,
        svid_ttl,
    )?)
}
