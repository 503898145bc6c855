//! The operator subcommands of the binary besides `serve`: a gRPC health probe and the token
//! hasher for the credentials file. Both print to stdout and report failure by exit status.

use std::io::Read;
use std::process::ExitCode;

use base64::Engine;
use sha2::{Digest, Sha256};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::{HashTokenArgs, HealthArgs};

/// `sendable-keys health`: exit 0 if the server reports SERVING.
pub async fn health(args: &HealthArgs) -> ExitCode {
    let check = async {
        let mut endpoint = tonic::transport::Endpoint::from_shared(args.addr.clone())
            .map_err(|e| format!("invalid address {:?}: {e}", args.addr))?;
        if let Some(ca) = &args.tls_ca {
            let pem =
                std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem));
            if let Some(domain) = &args.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("TLS configuration: {e}"))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", args.addr))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await
            .map_err(|e| format!("health check failed: {}", e.message()))?;
        Ok::<_, String>(response.into_inner().status)
    };
    match tokio::time::timeout(args.timeout, check).await {
        Ok(Ok(status)) if status == ServingStatus::Serving as i32 => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            let name = ServingStatus::try_from(status)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN");
            println!("{name}");
            ExitCode::FAILURE
        }
        Ok(Err(err)) => {
            eprintln!("sendable-keys health: {err}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("sendable-keys health: no answer within {:?}", args.timeout);
            ExitCode::FAILURE
        }
    }
}

/// Hex SHA-256 of a token, as written into `token_sha256` of the credentials file.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// `sendable-keys hash-token`.
pub fn hash_token(args: &HashTokenArgs) -> ExitCode {
    if args.generate {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        let token = format!(
            "skt_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        println!("token:        {token}");
        println!("token_sha256: {}", token_sha256(&token));
        return ExitCode::SUCCESS;
    }
    let mut input = String::new();
    if let Err(err) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("sendable-keys hash-token: cannot read stdin: {err}");
        return ExitCode::FAILURE;
    }
    // Reading from stdin keeps the token out of shell history and `ps`. A trailing newline
    // from `echo`, or any surrounding whitespace, is not part of it: the server trims the
    // presented token the same way.
    let token = crate::auth::presented_token(&input);
    if token.is_empty() {
        eprintln!(
            "sendable-keys hash-token: pipe the token on stdin, e.g. `printf %s \"$TOKEN\" | sendable-keys hash-token`"
        );
        return ExitCode::FAILURE;
    }
    println!("{}", token_sha256(token));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_is_hex_sha256() {
        assert_eq!(
            token_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// What `hash-token` hashes from its input is what the server compares: a token piped
    /// with a stray space or tab still matches its caller.
    #[test]
    fn hashed_input_matches_what_the_server_presents() {
        let hash = |input: &str| token_sha256(crate::auth::presented_token(input));
        for input in ["abc", "abc\n", "abc\r\n", " abc\t\n", "\tabc "] {
            assert_eq!(hash(input), token_sha256("abc"), "{input:?}");
        }
        let credentials = crate::auth::Credentials::from_toml(&format!(
            "[[caller]]\nname = \"svc\"\nrole = \"service\"\ntoken_sha256 = \"{}\"\n",
            hash(" abc\t\n")
        ))
        .expect("credentials");
        assert!(
            credentials
                .authenticate(crate::auth::presented_token("abc "))
                .is_some()
        );
    }
}
