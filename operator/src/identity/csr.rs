//! What the CA accepts in a certificate signing request.
//!
//! From a CSR only two things are used: its public key (the private key stays in the sidecar)
//! and, to catch a misconfigured sidecar early, the names it asks for. Everything else — subject,
//! key usages, a request to be a CA — is ignored: the CA alone decides what an SVID contains.

use rcgen::{CertificateSigningRequestParams, PublicKey, PublicKeyData, SanType};
use ringfence_crds::SpiffeId;
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

/// A CSR is a few hundred bytes; anything far larger is not one.
const MAX_CSR_PEM: usize = 16 * 1024;

/// Why a CSR is refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("it is not a PEM CERTIFICATE REQUEST ({0})")]
    NotPem(String),
    #[error("it is larger than {MAX_CSR_PEM} bytes")]
    TooLarge,
    #[error("it is not a valid PKCS#10 request ({0})")]
    Unparseable(String),
    #[error("its signature does not verify: the request was altered, or not signed by its key")]
    BadSignature,
    #[error(
        "it carries an extension other than SAN, key usage, EKU or basic constraints; send a plain CSR"
    )]
    UnsupportedExtension,
    #[error("its key type is not supported ({0}); generate an ECDSA P-256, P-384 or Ed25519 key")]
    UnsupportedKey(String),
    #[error(
        "it asks for {asked}, but the proof is for {proven}: a sidecar may only ask for its own agent's identity"
    )]
    OtherIdentity { asked: String, proven: SpiffeId },
    #[error(
        "it asks for names {asked:?}; an SVID has exactly one name, so send no SANs or only the URI SAN {proven}"
    )]
    ExtraNames {
        asked: Vec<String>,
        proven: SpiffeId,
    },
}

/// Verifies the CSR's signature and names and returns the key to certify.
///
/// `proven` is the identity the caller has already proved; the CSR may name it or nothing.
pub(super) fn checked_public_key(csr_pem: &str, proven: &SpiffeId) -> Result<PublicKey, CsrError> {
    if csr_pem.len() > MAX_CSR_PEM {
        return Err(CsrError::TooLarge);
    }
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CsrError::NotPem(e.to_string()))?;
    // rcgen (with its x509-parser feature) verifies the request's self-signature here.
    let params = CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
        rcgen::Error::UnsupportedExtension => CsrError::UnsupportedExtension,
        rcgen::Error::UnsupportedSignatureAlgorithm => CsrError::UnsupportedKey(e.to_string()),
        e => CsrError::Unparseable(e.to_string()),
    })?;

    match params.params.subject_alt_names.as_slice() {
        [] => {}
        [SanType::URI(uri)] if uri.as_str() == proven.to_string() => {}
        [SanType::URI(uri)] => {
            return Err(CsrError::OtherIdentity {
                asked: uri.as_str().to_owned(),
                proven: proven.clone(),
            });
        }
        names => {
            return Err(CsrError::ExtraNames {
                asked: names.iter().map(describe).collect(),
                proven: proven.clone(),
            });
        }
    }

    // rcgen re-encodes the key from the CSR's signature algorithm; a key it would encode
    // differently (say, a P-384 key signed with SHA-256) must not become a certificate for a
    // key nobody holds.
    let (_, request) = X509CertificationRequest::from_der(&der)
        .map_err(|e| CsrError::Unparseable(e.to_string()))?;
    let requested_spki = request.certification_request_info.subject_pki.raw;
    if params.public_key.subject_public_key_info() != requested_spki {
        return Err(CsrError::UnsupportedKey(format!(
            "key and signature algorithm {:?} do not match",
            params.public_key.algorithm()
        )));
    }
    Ok(params.public_key)
}

fn describe(name: &SanType) -> String {
    match name {
        SanType::URI(uri) => format!("URI:{}", uri.as_str()),
        SanType::DnsName(dns) => format!("DNS:{}", dns.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        SanType::Rfc822Name(mail) => format!("email:{}", mail.as_str()),
        SanType::OtherName((oid, _)) => format!("otherName:{oid:?}"),
        // SanType is non-exhaustive.
        #[allow(unreachable_patterns)]
        _ => "another name".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    const RESEARCH: &str = "spiffe://cluster.local/ns/default/agent/research";
    const WRITER: &str = "spiffe://cluster.local/ns/default/agent/writer";

    fn csr(sans: Vec<SanType>) -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, pem)
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn proven() -> SpiffeId {
        SpiffeId::parse(RESEARCH).unwrap()
    }

    #[test]
    fn a_csr_for_its_own_identity_or_no_name_is_accepted_with_its_key() {
        for sans in [vec![], vec![uri(RESEARCH)]] {
            let (key, pem) = csr(sans);
            let public = checked_public_key(&pem, &proven()).unwrap();
            assert_eq!(public.der_bytes(), key.public_key_raw());
        }
    }

    #[test]
    fn a_csr_for_another_agents_identity_is_refused() {
        let (_, pem) = csr(vec![uri(WRITER)]);
        let err = checked_public_key(&pem, &proven()).unwrap_err();
        assert!(matches!(err, CsrError::OtherIdentity { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("agent/writer") && msg.contains("agent/research"),
            "{msg}"
        );
    }

    #[test]
    fn a_csr_with_extra_names_is_refused() {
        for sans in [
            vec![
                uri(RESEARCH),
                SanType::DnsName("evil.example".try_into().unwrap()),
            ],
            vec![uri(RESEARCH), uri(RESEARCH)],
            vec![SanType::IpAddress([127, 0, 0, 1].into())],
            vec![SanType::DnsName("research".try_into().unwrap())],
        ] {
            let (_, pem) = csr(sans);
            let err = checked_public_key(&pem, &proven()).unwrap_err();
            assert!(matches!(err, CsrError::ExtraNames { .. }), "{err}");
        }
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let (_, pem) = csr(vec![uri(RESEARCH)]);
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec();
        // The last byte belongs to the signature's `s` value.
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let err = checked_public_key(&pem_of(&der), &proven()).unwrap_err();
        assert!(matches!(err, CsrError::BadSignature), "{err}");
    }

    #[test]
    fn text_that_is_not_a_csr_is_refused() {
        for junk in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            assert!(checked_public_key(junk, &proven()).is_err(), "{junk:?}");
        }
        let huge = "A".repeat(MAX_CSR_PEM + 1);
        assert!(matches!(
            checked_public_key(&huge, &proven()),
            Err(CsrError::TooLarge)
        ));
    }

    fn pem_of(der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            lines.join("\n")
        )
    }
}
