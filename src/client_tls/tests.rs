use super::*;

fn split(conn: &str) -> (String, SslSettings) {
    split_ssl_settings(conn).unwrap_or_else(|e| panic!("{conn}: {e}"))
}

fn settings(mode: Option<SslMode>, root: Option<&str>) -> SslSettings {
    SslSettings {
        mode,
        root_cert: root.map(|r| match r {
            "system" => RootCert::System,
            path => RootCert::File(PathBuf::from(path)),
        }),
    }
}

#[test]
fn url_form_parameters_are_taken_out_and_decoded() {
    let (rest, got) = split(
            "postgres://u:p%40ss@db.example:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca%20dir%2Froot.pem",
        );
    assert_eq!(
        rest,
        "postgres://u:p%40ss@db.example:5432/app?application_name=x"
    );
    assert_eq!(
        got,
        settings(Some(SslMode::VerifyFull), Some("/etc/ca dir/root.pem"))
    );
    // The key may be encoded too; the last occurrence wins; nothing left means no `?`.
    let (rest, got) =
        split("postgresql://db/app?ssl%6Dode=require&sslmode=verify-ca&sslrootcert=system");
    assert_eq!(rest, "postgresql://db/app");
    assert_eq!(got, settings(Some(SslMode::VerifyCa), Some("system")));
    // A `?` inside the credentials is not the start of the parameters.
    let (rest, got) = split("postgres://u:a?b@db/app?sslmode=disable");
    assert_eq!(rest, "postgres://u:a?b@db/app");
    assert_eq!(got.mode, Some(SslMode::Disable));
    let (rest, got) = split("postgres://db/app");
    assert_eq!(
        (rest.as_str(), got),
        ("postgres://db/app", SslSettings::default())
    );
}

#[test]
fn key_value_form_parameters_are_taken_out_with_quotes_and_escapes() {
    let (rest, got) = split(
            "host=db.example  sslmode = verify-full user=u sslrootcert='/etc/my ca/it\\'s.pem' dbname=app",
        );
    assert_eq!(rest, "host=db.example user=u dbname=app");
    assert_eq!(
        got,
        settings(Some(SslMode::VerifyFull), Some("/etc/my ca/it's.pem"))
    );
    let (rest, got) = split("host=/tmp/s password='a b' sslrootcert=C:\\\\ca.pem");
    assert_eq!(rest, "host=/tmp/s password='a b'");
    assert_eq!(got, settings(None, Some("C:\\ca.pem")));
}

#[test]
fn bad_values_are_refused() {
    for conn in [
        "host=db sslmode=verify_full",
        "host=db sslmode=allow",
        "host=db sslmode=",
        "postgres://db/app?sslmode=REQUIRE",
        "postgres://db/app?sslmode=%zz",
        "postgres://db/app?sslrootcert=%FF",
        "host=db sslrootcert='/unterminated",
        "host=db sslmode",
    ] {
        assert!(split_ssl_settings(conn).is_err(), "{conn}");
    }
    let error = split_ssl_settings("host=db sslmode=bogus").unwrap_err();
    assert!(
        error.contains("sslmode") && error.contains("verify-full"),
        "{error}"
    );
}

fn parse(conn: &str) -> Result<DatabaseConfig, String> {
    conn.parse::<DatabaseConfig>().map_err(|e| e.0)
}

#[test]
fn modes_map_to_what_tokio_postgres_negotiates_with_libpq_defaults() {
    use tokio_postgres::config::SslMode as Negotiated;
    let mode = |conn: &str| {
        let config = parse(conn).unwrap();
        (config.tls.mode(), config.postgres.get_ssl_mode())
    };
    assert_eq!(
        mode("host=db user=u"),
        (SslMode::Prefer, Negotiated::Prefer)
    );
    assert_eq!(
        mode("host=db sslmode=disable"),
        (SslMode::Disable, Negotiated::Disable)
    );
    assert_eq!(
        mode("postgres://db/x?sslmode=require"),
        (SslMode::Require, Negotiated::Require)
    );
    assert_eq!(
        mode("host=db sslrootcert=system"),
        (SslMode::VerifyFull, Negotiated::Require)
    );
    // Unix sockets never use TLS, whatever the mode.
    assert_eq!(
        mode("host=/tmp/sock sslmode=require"),
        (SslMode::Disable, Negotiated::Disable)
    );
    assert_eq!(
        mode("postgres://u@%2Ftmp%2Fsock/x?sslmode=verify-full&sslrootcert=/nonexistent"),
        (SslMode::Disable, Negotiated::Disable)
    );
}

#[test]
fn unusable_tls_settings_are_refused() {
    for (conn, expected) in [
        ("host=db sslmode=verify-full", "needs sslrootcert"),
        ("host=db sslmode=verify-ca", "needs sslrootcert"),
        ("host=db sslmode=require sslrootcert=system", "verify-full"),
        (
            "host=db sslmode=verify-ca sslrootcert=/nonexistent/ca.pem",
            "/nonexistent/ca.pem",
        ),
        ("host=db,/tmp/sock sslmode=require", "Unix sockets"),
        (
            "host=db sslmode=verify-full sslrootcert=/dev/null",
            "no PEM certificate",
        ),
    ] {
        let error = parse(conn).expect_err(conn);
        assert!(error.contains(expected), "{conn}: {error}");
    }
}

#[test]
fn the_channel_binding_hash_follows_the_certificates_signature_algorithm() {
    let certificate = |algorithm: &'static rcgen::SignatureAlgorithm| {
        let key = rcgen::KeyPair::generate_for(algorithm).unwrap();
        let params = rcgen::CertificateParams::new(vec!["db.example".to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    };
    let p256 = certificate(&rcgen::PKCS_ECDSA_P256_SHA256);
    assert_eq!(
        tls_server_end_point(&p256).as_deref(),
        Some(ring::digest::digest(&ring::digest::SHA256, &p256).as_ref())
    );
    let p384 = certificate(&rcgen::PKCS_ECDSA_P384_SHA384);
    assert_eq!(
        tls_server_end_point(&p384).as_deref(),
        Some(ring::digest::digest(&ring::digest::SHA384, &p384).as_ref())
    );
    // Ed25519 defines no hash for it (nor does PostgreSQL): no channel binding.
    assert_eq!(
        tls_server_end_point(&certificate(&rcgen::PKCS_ED25519)),
        None
    );
    assert_eq!(tls_server_end_point(&p256[..p256.len() / 2]), None);
    assert_eq!(tls_server_end_point(b""), None);
}

#[test]
fn a_ca_file_must_hold_usable_certificates() {
    let dir = std::env::temp_dir().join(format!("mana-sync-client-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(
        {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
        },
        rcgen::KeyPair::generate().unwrap(),
    )
    .unwrap();
    let good = dir.join("ca.pem");
    std::fs::write(&good, ca.pem()).unwrap();
    assert_eq!(read_ca_certificates(&good).unwrap().len(), 1);
    assert!(OutboundTls::with_ca_file(&good).is_ok());
    let garbage = dir.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(read_ca_certificates(&garbage).is_err());
    assert!(read_ca_certificates(&dir.join("missing.pem")).is_err());
    let conn = format!("host=db sslmode=verify-full sslrootcert={}", good.display());
    assert_eq!(parse(&conn).unwrap().tls.mode(), SslMode::VerifyFull);
    std::fs::remove_dir_all(&dir).unwrap();
}
