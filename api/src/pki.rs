//! Cluster secrets made in one place for every component that makes them (`strata-engine certs
//! init`, the operator): the cluster CA that signs node certificates, and the system key that
//! signs the engines' SDK tokens.

use rustls_pki_types::pem::PemObject;

/// A new self-signed cluster CA: (certificate PEM, private key PEM).
pub fn new_ca() -> Result<(String, String), rcgen::Error> {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, "Strata cluster CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let k = rcgen::KeyPair::generate()?;
    let c = p.self_signed(&k)?;
    Ok((c.pem(), k.serialize_pem()))
}

/// A certificate signed by the CA (`ca_cert`, `ca_key`, PEM) whose identity is `name` (its
/// first DNS name) and which is also valid for `hosts` (IP addresses or DNS names), for both
/// ends of a TLS connection: (certificate PEM, private key PEM).
///
/// `ca_cert` may bundle several CAs (while one replaces another): the one whose public key is
/// `ca_key`'s signs.
pub fn sign(ca_cert: &str, ca_key: &str, name: &str, hosts: &[String]) -> Result<(String, String), rcgen::Error> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key)?;
    let ca = rcgen::CertificateParams::from_ca_cert_pem(&signing_ca(ca_cert, &ca_key))?.self_signed(&ca_key)?;
    let mut p = rcgen::CertificateParams::new(std::iter::once(name.to_string()).chain(hosts.iter().cloned()).collect::<Vec<_>>())?;
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let k = rcgen::KeyPair::generate()?;
    let c = p.signed_by(&k, &ca, &ca_key)?;
    Ok((c.pem(), k.serialize_pem()))
}

/// The certificate of `bundle` (PEM) whose public key is `key`'s, as PEM; the first one when
/// none matches (rcgen then signs under that name, and a verifier refuses the result).
fn signing_ca(bundle: &str, key: &rcgen::KeyPair) -> String {
    let blocks: Vec<&str> = bundle.split_inclusive("-----END CERTIFICATE-----").filter(|b| b.contains("-----BEGIN CERTIFICATE-----")).collect();
    let matches = |pem: &&str| {
        rustls_pki_types::CertificateDer::from_pem_slice(pem.trim_start().as_bytes()).ok().is_some_and(|der| {
            x509_parser::parse_x509_certificate(der.as_ref())
                .is_ok_and(|(_, c)| c.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
        })
    };
    blocks.iter().copied().find(matches).or(blocks.first().copied()).map(|b| b.trim_start().to_string()).unwrap_or_else(|| bundle.to_string())
}

/// A new system key: 64 hex digits from the OS's random source (244 random bits).
pub fn new_system_key() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    #[test]
    fn system_keys_are_long_enough_and_differ() {
        let (a, b) = (super::new_system_key(), super::new_system_key());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(crate::auth::IssuerKey::from_file_content(a.as_bytes()).is_ok());
    }

    #[test]
    fn with_a_bundle_of_two_cas_the_one_holding_the_key_signs() {
        use rustls_pki_types::pem::PemObject;
        let (old, _) = super::new_ca().unwrap();
        let (new, new_key) = super::new_ca().unwrap();
        let spki = |cert: &str| {
            let der = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
            let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
            c.public_key().raw.to_vec()
        };
        // Old first, new second: the new CA's key must pick the new CA (both carry the same
        // name; the e2e rotation test verifies the signature itself).
        let bundle = format!("{old}{new}");
        assert!(super::sign(&bundle, &new_key, "n1", &[]).is_ok());
        let key = rcgen::KeyPair::from_pem(&new_key).unwrap();
        assert_eq!(super::signing_ca(&bundle, &key).trim(), new.trim());
        assert_ne!(spki(&old), spki(&new));
    }
}
