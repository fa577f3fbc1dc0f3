//! Cluster secrets made in one place for every component that makes them (`strata-engine certs
//! init`, the operator): the cluster CA that signs node certificates, and the system key that
//! signs the engines' SDK tokens.

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
pub fn sign(ca_cert: &str, ca_key: &str, name: &str, hosts: &[String]) -> Result<(String, String), rcgen::Error> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key)?;
    let ca = rcgen::CertificateParams::from_ca_cert_pem(ca_cert)?.self_signed(&ca_key)?;
    let mut p = rcgen::CertificateParams::new(std::iter::once(name.to_string()).chain(hosts.iter().cloned()).collect::<Vec<_>>())?;
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let k = rcgen::KeyPair::generate()?;
    let c = p.signed_by(&k, &ca, &ca_key)?;
    Ok((c.pem(), k.serialize_pem()))
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
}
