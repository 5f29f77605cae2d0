//! The trust domain's certificate authority: one key and one self-signed certificate, kept in
//! `<state>/ca/` so every SVID ever issued stays verifiable across restarts.
//!
//! The key is never regenerated over an existing one: a corrupt or missing key stops the control
//! plane with the file named, because a new key would silently cut every sidecar off the mesh.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use ringfence_crds::svid::{self, SpiffeServerVerifier};
use ringfence_crds::{SpiffeId, TrustDomain};
use rustls::RootCertStore;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use super::files;

/// How long a new CA certificate is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// New CA certificates start an hour early, so a peer whose clock lags still trusts them.
const CA_BACKDATE: Duration = Duration::from_secs(3600);
/// Leaf certificates start this early, for clock skew between the control plane and sidecars.
const LEAF_BACKDATE: Duration = Duration::from_secs(5 * 60);
/// How long the control plane's own serving certificate is valid.
const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why the CA cannot be loaded, created or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "cannot {action} {path}: {source}; check that the state directory exists and the control plane may write to it"
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the CA key {path} is corrupt ({detail}); restore it from a backup. Deleting it starts a new CA that no running sidecar trusts"
    )]
    CorruptKey { path: PathBuf, detail: String },
    #[error(
        "the CA certificate {path} is corrupt ({detail}); restore it, or delete it alone to re-issue it from the existing key"
    )]
    CorruptCert { path: PathBuf, detail: String },
    #[error(
        "the CA certificate {cert} exists but its key {key} does not; restore the key, or delete both to start a new CA that no running sidecar trusts"
    )]
    KeyMissing { key: PathBuf, cert: PathBuf },
    #[error(
        "the CA key {key} does not belong to the certificate {cert}; restore the matching pair"
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error(
        "the CA in {dir} is for trust domain {found}, but the control plane is configured for {configured}; fix the trust domain setting or point it at another state directory"
    )]
    TrustDomainMismatch {
        dir: PathBuf,
        found: String,
        configured: TrustDomain,
    },
    #[error(
        "the CA certificate {path} expired at {not_after}; every SVID it signs would be refused. Rotate the CA"
    )]
    Expired {
        path: PathBuf,
        not_after: OffsetDateTime,
    },
    #[error(
        "the CA in {dir} signs certificates its own certificate does not verify ({detail}); the key and certificate do not belong together"
    )]
    SelfCheck { dir: PathBuf, detail: String },
    #[error("the serving certificate name {name:?} is not a DNS name or an IP address")]
    ServingName { name: String },
    #[error("signing failed: {0}; this is a bug or the CA key is unusable")]
    Sign(#[from] rcgen::Error),
    #[error("the system random number generator failed; the host cannot issue certificates")]
    Random,
}

/// A certificate the CA issued.
pub(super) struct Issued {
    pub der: CertificateDer<'static>,
    pub pem: String,
    pub not_after: OffsetDateTime,
}

/// The trust domain's CA, loaded and ready to sign.
pub(super) struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_path: PathBuf,
    roots: Arc<RootCertStore>,
    not_after: OffsetDateTime,
}

impl Ca {
    /// Loads the CA from `<state_dir>/ca/`, creating it on first start.
    ///
    /// A key without a certificate (a crash between the two writes, or a certificate removed on
    /// purpose) gets a new certificate for the same key and name, which verifies everything the
    /// old one did.
    pub fn load_or_create(state_dir: &Path, trust_domain: TrustDomain) -> Result<Self, CaError> {
        let dir = state_dir.join("ca");
        let key_path = dir.join("key.pem");
        let cert_path = dir.join("cert.pem");
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io {
                action,
                path,
                source,
            }
        };
        files::private_dir(&dir).map_err(io("create", &dir))?;
        let key_pem = files::read_if_exists(&key_path).map_err(io("read", &key_path))?;
        let cert_pem = files::read_if_exists(&cert_path).map_err(io("read", &cert_path))?;
        let now = OffsetDateTime::now_utc();

        let ca = match (key_pem, cert_pem) {
            (None, None) => {
                let key = KeyPair::generate()?;
                // Key first: a crash before the certificate is written is repaired on restart.
                files::write_private(&key_path, key.serialize_pem().as_bytes())
                    .map_err(io("write", &key_path))?;
                let ca = Self::self_sign(key, trust_domain, cert_path.clone(), now)?;
                files::write_private(&cert_path, ca.cert_pem.as_bytes())
                    .map_err(io("write", &cert_path))?;
                tracing::info!(trust_domain = %ca.trust_domain, dir = %dir.display(), "created the trust domain CA");
                ca
            }
            (Some(key_pem), None) => {
                let key = parse_key(&key_pem, &key_path)?;
                let ca = Self::self_sign(key, trust_domain, cert_path.clone(), now)?;
                files::write_private(&cert_path, ca.cert_pem.as_bytes())
                    .map_err(io("write", &cert_path))?;
                tracing::warn!(path = %cert_path.display(), "CA certificate was missing; re-issued it from the existing key");
                ca
            }
            (None, Some(_)) => {
                return Err(CaError::KeyMissing {
                    key: key_path,
                    cert: cert_path,
                });
            }
            (Some(key_pem), Some(cert_pem)) => {
                let key = parse_key(&key_pem, &key_path)?;
                Self::load(key, &key_path, cert_pem, cert_path, &dir, trust_domain, now)?
            }
        };
        ca.self_check(&dir, now)?;
        Ok(ca)
    }

    /// Loads a CA handed over as PEM (a Kubernetes Secret, possibly written by cert-manager).
    /// `origin` names where it came from, for error messages, e.g. `secret ringfence/ringfence-ca`.
    pub fn from_pem(
        key_pem: &str,
        cert_pem: &str,
        origin: &str,
        trust_domain: TrustDomain,
    ) -> Result<Self, CaError> {
        let key_path = PathBuf::from(format!("{origin} (tls.key)"));
        let cert_path = PathBuf::from(format!("{origin} (tls.crt)"));
        let dir = PathBuf::from(origin);
        let now = OffsetDateTime::now_utc();
        let key = parse_key(key_pem, &key_path)?;
        let ca = Self::load(
            key,
            &key_path,
            cert_pem.to_owned(),
            cert_path,
            &dir,
            trust_domain,
            now,
        )?;
        ca.self_check(&dir, now)?;
        Ok(ca)
    }

    /// Makes a new CA in memory; returns it with its key as PEM, for the caller to keep.
    pub fn generate(trust_domain: TrustDomain, origin: &str) -> Result<(Self, String), CaError> {
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let now = OffsetDateTime::now_utc();
        let ca = Self::self_sign(
            key,
            trust_domain,
            PathBuf::from(format!("{origin} (tls.crt)")),
            now,
        )?;
        ca.self_check(Path::new(origin), now)?;
        Ok((ca, key_pem))
    }

    fn self_sign(
        key: KeyPair,
        trust_domain: TrustDomain,
        cert_path: PathBuf,
        now: OffsetDateTime,
    ) -> Result<Self, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Ringfence");
        dn.push(DnType::CommonName, format!("Ringfence CA {trust_domain}"));
        params.distinguished_name = dn;
        // The trust domain's own SPIFFE ID names the CA, so a restart with another trust domain
        // setting is caught instead of issuing SVIDs nobody expects.
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        // Path length 0: this CA signs leaves only.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - CA_BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            roots: roots_of(cert.der(), &cert_path)?,
            not_after: params.not_after,
            cert_pem: cert.pem(),
            cert_path,
            issuer: Issuer::new(params, key),
            trust_domain,
        })
    }

    fn load(
        key: KeyPair,
        key_path: &Path,
        cert_pem: String,
        cert_path: PathBuf,
        dir: &Path,
        trust_domain: TrustDomain,
        now: OffsetDateTime,
    ) -> Result<Self, CaError> {
        let corrupt = |detail: String| CaError::CorruptCert {
            path: cert_path.clone(),
            detail,
        };
        let der = svid::certs_from_pem(&cert_pem)
            .map_err(|e| corrupt(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| corrupt("no certificate in it".to_owned()))?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| corrupt(e.to_string()))?;
        if !x509.is_ca() {
            return Err(corrupt("it is not a CA certificate".to_owned()));
        }
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::KeyMismatch {
                key: key_path.to_owned(),
                cert: cert_path,
            });
        }
        // A CA supplied from elsewhere (cert-manager) may not name a trust domain; ours always do.
        let sans = x509
            .subject_alternative_name()
            .map_err(|e| corrupt(e.to_string()))?;
        let named = sans
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .find_map(|name| match name {
                GeneralName::URI(uri) => uri.strip_prefix("spiffe://"),
                _ => None,
            });
        if let Some(found) = named
            && found != trust_domain.as_str()
        {
            return Err(CaError::TrustDomainMismatch {
                dir: dir.to_owned(),
                found: found.to_owned(),
                configured: trust_domain,
            });
        }
        let not_after = OffsetDateTime::from_unix_timestamp(x509.validity().not_after.timestamp())
            .map_err(|e| corrupt(e.to_string()))?;
        if not_after <= now {
            return Err(CaError::Expired {
                path: cert_path,
                not_after,
            });
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| corrupt(e.to_string()))?;
        Ok(Self {
            trust_domain,
            issuer,
            roots: roots_of(&der, &cert_path)?,
            cert_pem,
            cert_path,
            not_after,
        })
    }

    /// Issues a throwaway SVID and verifies it against our own bundle, so a CA that cannot
    /// produce verifiable certificates fails at start-up, not at a sidecar's first CSR.
    fn self_check(&self, dir: &Path, now: OffsetDateTime) -> Result<(), CaError> {
        let failed = |detail: String| CaError::SelfCheck {
            dir: dir.to_owned(),
            detail,
        };
        let probe_id = SpiffeId::parse(&format!(
            "spiffe://{}/ns/ringfence-system/agent/self-check",
            self.trust_domain
        ))
        .map_err(|e| failed(e.to_string()))?;
        let probe_key = KeyPair::generate()?;
        let issued = self.sign_svid(&probe_key, &probe_id, Duration::from_secs(600), now)?;
        self.verify(&issued, &probe_id, now)
            .map_err(|e| failed(e.to_string()))
    }

    /// Checks that `issued` verifies against this CA as an SVID of `id`.
    pub fn verify(
        &self,
        issued: &Issued,
        id: &SpiffeId,
        now: OffsetDateTime,
    ) -> Result<(), rustls::Error> {
        let verifier = SpiffeServerVerifier::new(self.roots.clone(), id.clone());
        let name = ServerName::try_from("svid.invalid")
            .map_err(|e| rustls::Error::General(format!("fixed server name is invalid: {e}")))?;
        let secs = u64::try_from(now.unix_timestamp()).unwrap_or(0);
        let at = UnixTime::since_unix_epoch(Duration::from_secs(secs));
        verifier.verify_server_cert(&issued.der, &[], &name, &[], at)?;
        Ok(())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// Signs an X.509-SVID for `id` over `public_key`: a leaf (never a CA) whose only name is
    /// the one URI SAN, usable for both ends of mTLS.
    pub fn sign_svid(
        &self,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        let mut params = self.leaf_params(ttl, now)?;
        // An empty subject makes rcgen mark the SAN critical, as RFC 5280 requires; the SPIFFE
        // ID is the certificate's only name.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(&params, public_key)
    }

    /// Signs the control plane's serving certificate: DNS names and IPs, serverAuth only, so it
    /// can never pass for an agent.
    pub fn sign_serving(
        &self,
        public_key: &impl PublicKeyData,
        names: &[String],
        now: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        let mut params = self.leaf_params(SERVING_VALIDITY, now)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ringfence control plane");
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|name| {
                let one = CertificateParams::new(vec![name.clone()])
                    .map_err(|_| CaError::ServingName { name: name.clone() })?;
                Ok(one.subject_alt_names.into_iter().next())
            })
            .filter_map(Result::transpose)
            .collect::<Result<_, CaError>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(&params, public_key)
    }

    fn leaf_params(
        &self,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<CertificateParams, CaError> {
        if self.not_after <= now {
            return Err(CaError::Expired {
                path: self.cert_path.clone(),
                not_after: self.not_after,
            });
        }
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = now - LEAF_BACKDATE;
        // Nothing outlives its issuer.
        params.not_after = (now + ttl).min(self.not_after);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<Issued, CaError> {
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(Issued {
            pem: cert.pem(),
            der: cert.der().clone(),
            not_after: params.not_after,
        })
    }
}

fn parse_key(pem: &str, path: &Path) -> Result<KeyPair, CaError> {
    KeyPair::from_pem(pem).map_err(|e| CaError::CorruptKey {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

fn roots_of(der: &CertificateDer<'_>, path: &Path) -> Result<Arc<RootCertStore>, CaError> {
    let mut roots = RootCertStore::empty();
    roots.add(der.clone()).map_err(|e| CaError::CorruptCert {
        path: path.to_owned(),
        detail: format!("not usable as a trust anchor: {e}"),
    })?;
    Ok(Arc::new(roots))
}

/// 128 random bits; serials must be unpredictable (RFC 5280 allows up to 20 octets). The top
/// bit is cleared so the DER INTEGER stays positive without padding.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::default()
    }

    #[test]
    fn the_ca_survives_a_restart_with_the_same_key_and_certificate() {
        let state = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(state.path(), td()).unwrap();
        let second = Ca::load_or_create(state.path(), td()).unwrap();
        assert_eq!(first.cert_pem(), second.cert_pem());
        let key = std::fs::read_to_string(state.path().join("ca/key.pem")).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        let mode = std::fs::metadata(state.path().join("ca/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // An SVID issued before the restart verifies against the reloaded CA.
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/agent/research").unwrap();
        let key = KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let svid = first
            .sign_svid(&key, &id, Duration::from_secs(3600), now)
            .unwrap();
        second.verify(&svid, &id, now).unwrap();
    }

    #[test]
    fn a_corrupt_ca_key_stops_the_control_plane_and_names_the_file() {
        let state = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(state.path(), td()).unwrap();
        let key_path = state.path().join("ca/key.pem");
        std::fs::write(&key_path, "-----BEGIN PRIVATE KEY-----\ngarbage\n").unwrap();
        let err = Ca::load_or_create(state.path(), td()).err().unwrap();
        assert!(matches!(err, CaError::CorruptKey { .. }), "{err}");
        assert!(
            err.to_string().contains(&*key_path.to_string_lossy()),
            "{err}"
        );
        // Nothing was regenerated over it.
        let on_disk = std::fs::read_to_string(&key_path).unwrap();
        assert!(on_disk.contains("garbage"));
        assert_eq!(
            std::fs::read_to_string(state.path().join("ca/cert.pem")).unwrap(),
            first.cert_pem()
        );
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let state = tempfile::tempdir().unwrap();
        Ca::load_or_create(state.path(), td()).unwrap();
        std::fs::remove_file(state.path().join("ca/key.pem")).unwrap();
        let err = Ca::load_or_create(state.path(), td()).err().unwrap();
        assert!(matches!(err, CaError::KeyMissing { .. }), "{err}");
    }

    #[test]
    fn a_lost_ca_certificate_is_reissued_from_the_key_and_still_verifies_old_svids() {
        let state = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(state.path(), td()).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/agent/research").unwrap();
        let now = OffsetDateTime::now_utc();
        let svid = first
            .sign_svid(
                &KeyPair::generate().unwrap(),
                &id,
                Duration::from_secs(3600),
                now,
            )
            .unwrap();
        std::fs::remove_file(state.path().join("ca/cert.pem")).unwrap();
        let second = Ca::load_or_create(state.path(), td()).unwrap();
        second.verify(&svid, &id, now).unwrap();
    }

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused() {
        let state = tempfile::tempdir().unwrap();
        Ca::load_or_create(state.path(), td()).unwrap();
        let other = KeyPair::generate().unwrap();
        std::fs::write(state.path().join("ca/key.pem"), other.serialize_pem()).unwrap();
        let err = Ca::load_or_create(state.path(), td()).err().unwrap();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn a_restart_with_another_trust_domain_is_refused() {
        let state = tempfile::tempdir().unwrap();
        Ca::load_or_create(state.path(), td()).unwrap();
        let other = TrustDomain::new("example.org").unwrap();
        let err = Ca::load_or_create(state.path(), other).err().unwrap();
        assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");
    }

    #[test]
    fn an_svid_never_outlives_its_ca() {
        let state = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(state.path(), td()).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/agent/research").unwrap();
        let key = KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let svid = ca.sign_svid(&key, &id, CA_VALIDITY * 2, now).unwrap();
        assert_eq!(svid.not_after, ca.not_after);
    }

    #[test]
    fn a_generated_ca_loads_back_from_its_pem_and_verifies_its_svids() {
        let (ca, key_pem) = Ca::generate(td(), "secret ringfence/ringfence-ca").unwrap();
        let again = Ca::from_pem(
            &key_pem,
            ca.cert_pem(),
            "secret ringfence/ringfence-ca",
            td(),
        )
        .unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/agent/research").unwrap();
        let now = OffsetDateTime::now_utc();
        let svid = ca
            .sign_svid(
                &KeyPair::generate().unwrap(),
                &id,
                Duration::from_secs(60),
                now,
            )
            .unwrap();
        again.verify(&svid, &id, now).unwrap();

        let other = KeyPair::generate().unwrap().serialize_pem();
        let err = Ca::from_pem(&other, ca.cert_pem(), "secret ringfence/ringfence-ca", td())
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("secret ringfence/ringfence-ca (tls.key)"),
            "{err}"
        );
    }

    #[test]
    fn serials_are_random() {
        let state = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(state.path(), td()).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/agent/research").unwrap();
        // Same key, same identity, same instant: only the serial can differ.
        let key = KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let a = ca
            .sign_svid(&key, &id, Duration::from_secs(60), now)
            .unwrap();
        let b = ca
            .sign_svid(&key, &id, Duration::from_secs(60), now)
            .unwrap();
        let serial = |der: &[u8]| {
            x509_parser::parse_x509_certificate(der)
                .unwrap()
                .1
                .raw_serial()
                .to_vec()
        };
        assert_ne!(serial(&a.der), serial(&b.der));
    }
}
