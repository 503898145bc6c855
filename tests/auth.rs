//! Who may call what, through the real server: bearer tokens and roles, open health and
//! reflection, the caller's name in the audit log, and TLS / mutual TLS on the gRPC port.

mod common;

use common::{TestServer, reason, unique_session};
use sendable_keys::app::ServeOptions;
use sendable_keys::auth::Credentials;
use sendable_keys::cli::token_sha256;
use sendable_keys::grpc::layer::AccessPolicy;
use sendable_keys::grpc::pb;
use sendable_keys::grpc::pb::key_service_client::KeyServiceClient;
use sendable_keys::grpc::pb::usage_service_client::UsageServiceClient;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};

const ADMIN_TOKEN: &str = "skt_admin-token-for-tests-0123456789";
const SERVICE_TOKEN: &str = "skt_chat-service-token-0123456789ab";

fn credentials() -> Credentials {
    Credentials::from_toml(&format!(
        "[[caller]]\nname = \"ops\"\nrole = \"admin\"\ntoken_sha256 = \"{}\"\n\n\
         [[caller]]\nname = \"chat-service\"\nrole = \"service\"\ntoken_sha256 = \"{}\"\n",
        token_sha256(ADMIN_TOKEN),
        token_sha256(SERVICE_TOKEN)
    ))
    .expect("credentials")
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("metadata");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

async fn authed_server() -> TestServer {
    TestServer::start_with_options(
        ServeOptions {
            access: AccessPolicy::new(Some(credentials()), false),
            ..ServeOptions::default()
        },
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_decide_who_may_call_what() {
    let server = authed_server().await;
    let mut keys = KeyServiceClient::new(server.channel.clone());
    let mut usage = UsageServiceClient::new(server.channel.clone());
    let id = unique_session("auth");
    let create_session = pb::CreateSessionRequest {
        session_id: id.clone(),
        environment: pb::Environment::Live as i32,
        plan: pb::Plan::Free as i32,
        ..Default::default()
    };

    // No token, a wrong token: UNAUTHENTICATED.
    for token in [None, Some("not-a-token")] {
        let err = keys
            .create_session(with_token(create_session.clone(), token))
            .await
            .expect_err("no valid token");
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
        assert_eq!(reason(&err), "UNAUTHENTICATED");
        assert!(
            !err.message().contains("not-a-token"),
            "the token is not echoed"
        );
    }
    // A service token cannot manage keys.
    let err = keys
        .create_session(with_token(create_session.clone(), Some(SERVICE_TOKEN)))
        .await
        .expect_err("service role");
    assert_eq!(err.code(), Code::PermissionDenied);

    // The admin can; the audit log names the caller.
    keys.create_session(with_token(create_session.clone(), Some(ADMIN_TOKEN)))
        .await
        .expect("admin creates");
    let created = keys
        .create_key(with_token(
            pb::CreateKeyRequest {
                session_id: id.clone(),
                name: "chat".into(),
                expire_time: None,
            },
            Some(ADMIN_TOKEN),
        ))
        .await
        .expect("admin creates a key")
        .into_inner();
    let audit = keys
        .list_audit_events(with_token(
            pb::ListAuditEventsRequest {
                session_id: id.clone(),
                page_size: 10,
                page_token: String::new(),
            },
            Some(ADMIN_TOKEN),
        ))
        .await
        .expect("audit")
        .into_inner();
    assert!(
        audit.events.iter().all(|e| e.caller == "ops"),
        "{:?}",
        audit.events
    );

    // The service role covers exactly the per-request calls.
    let verified = keys
        .verify_key(with_token(
            pb::VerifyKeyRequest {
                key: created.secret.clone(),
                expected_environment: 0,
                cost: 0,
            },
            Some(SERVICE_TOKEN),
        ))
        .await
        .expect("service verifies")
        .into_inner();
    assert!(verified.valid);
    let key_id = created.key.expect("key").key_id;
    usage
        .record_outcomes(with_token(
            pb::RecordOutcomesRequest {
                outcomes: vec![pb::Outcome {
                    key_id: key_id.clone(),
                    success: true,
                    ..Default::default()
                }],
            },
            Some(SERVICE_TOKEN),
        ))
        .await
        .expect("service records outcomes");
    // Reading a key's window by id is the dashboard's (any tenant's key id would do).
    let err = usage
        .get_rate_limit_status(with_token(
            pb::GetRateLimitStatusRequest {
                key_id: key_id.clone(),
            },
            Some(SERVICE_TOKEN),
        ))
        .await
        .expect_err("the window is for admins");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = usage
        .list_alerts(with_token(
            pb::ListAlertsRequest {
                session_id: id.clone(),
            },
            Some(SERVICE_TOKEN),
        ))
        .await
        .expect_err("alerts are for admins");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = keys
        .revoke_key(with_token(
            pb::RevokeKeyRequest {
                key_id,
                reason: String::new(),
            },
            Some(SERVICE_TOKEN),
        ))
        .await
        .expect_err("service may not revoke");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(reason(&err), "PERMISSION_DENIED");

    // Health and reflection need nothing.
    let health = server
        .health()
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is open")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

struct Pki {
    ca_pem: String,
    server: Identity,
    client: Identity,
}

/// A throwaway CA with a server certificate for `localhost` and a client certificate.
fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("cert");
        Identity::from_pem(cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca_cert.pem(),
        server: leaf(vec!["localhost".into()]),
        client: leaf(vec!["chat-service".into()]),
    }
}

async fn health_over(channel: Channel) -> Result<i32, tonic::Status> {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_the_ca() {
    let pki = pki();
    let trusting = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem));
    let server = TestServer::start_with_options(
        ServeOptions {
            tls: Some(ServerTlsConfig::new().identity(pki.server.clone())),
            ..ServeOptions::default()
        },
        Some(trusting),
    )
    .await;
    assert!(health_over(server.channel.clone()).await.is_ok());
    // Plain-text gRPC to a TLS port fails.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect_lazy();
    assert!(health_over(plain).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate() {
    let pki = pki();
    let options = || ServeOptions {
        tls: Some(
            ServerTlsConfig::new()
                .identity(pki.server.clone())
                .client_ca_root(Certificate::from_pem(&pki.ca_pem)),
        ),
        ..ServeOptions::default()
    };
    let with_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .identity(pki.client.clone());
    let server = TestServer::start_with_options(options(), Some(with_cert)).await;
    assert!(
        health_over(server.channel.clone()).await.is_ok(),
        "client with a certificate"
    );

    let without_cert = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem));
    let anonymous = Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
        .expect("uri")
        .tls_config(without_cert)
        .expect("tls")
        .connect_lazy();
    assert!(
        health_over(anonymous).await.is_err(),
        "no client certificate, no service"
    );
}
