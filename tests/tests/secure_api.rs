//! Integration: access to the API. On TCP it takes mutual TLS: a client with a
//! certificate from the agent's client CA is served; one from another CA, or with none,
//! is refused; the agent will not serve TCP without TLS unless told to, and then says
//! so. Calls beyond the request rate are refused with RESOURCE_EXHAUSTED. Needs root.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use dataplane_proto::v1::{self as pb, dataplane_client::DataplaneClient};
use dataplane_tests::{agent::Agent, netns::NetNs};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Uri};

const NODE: &str = "tls-node";
/// The name in the agent's certificate, which clients check.
const AGENT_NAME: &str = "agent.test";
const ADDRESS: &str = "127.0.0.1:50051";

/// A CA for the test: its certificate, and it as an issuer.
fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// A certificate for `name` from `issuer`, for `purpose`: (certificate, key), PEM.
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    purpose: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![purpose];
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The files of a PKI under a directory of its own, removed at the end.
struct Pki {
    dir: PathBuf,
    trusted: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(tag: &str) -> Result<Pki> {
        let dir = std::env::temp_dir().join(format!("dp-pki-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let pki = Pki {
            dir,
            trusted: ca("clients")?,
        };
        let (cert, key) = leaf(
            &pki.trusted,
            AGENT_NAME,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        pki.write("agent.pem", &cert)?;
        pki.write("agent.key", &key)?;
        pki.write("ca.pem", &pki.trusted.pem())?;
        Ok(pki)
    }

    fn write(&self, name: &str, text: &str) -> Result<()> {
        Ok(std::fs::write(self.dir.join(name), text)?)
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Calls `ListPorts` over TLS from inside `node`, presenting `identity` (certificate,
/// key) if given, trusting `ca` for the agent's certificate.
async fn list_ports(
    node: &NetNs,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<pb::ListPortsResponse> {
    let address: SocketAddr = ADDRESS.parse()?;
    let stream = node.run(move || std::net::TcpStream::connect(address))??;
    stream.set_nonblocking(true)?;
    // The connection is made in the node's namespace; the channel takes it once.
    let stream = Arc::new(Mutex::new(Some(tokio::net::TcpStream::from_std(stream)?)));
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(AGENT_NAME);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{AGENT_NAME}"))?
        .tls_config(tls)?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let stream = stream.lock().unwrap().take();
            async move {
                stream
                    .map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("one connection only"))
            }
        }))
        .await?;
    Ok(DataplaneClient::new(channel)
        .list_ports(pb::ListRequest::default())
        .await?
        .into_inner())
}

async fn start_with_tls(node: &NetNs, pki: &Pki) -> Result<Agent> {
    let (cert, key, ca) = (
        pki.path("agent.pem"),
        pki.path("agent.key"),
        pki.path("ca.pem"),
    );
    Agent::start_with(
        node,
        NODE,
        &[
            "--grpc-tcp",
            ADDRESS,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ],
    )
    .await
}

#[tokio::test]
async fn a_client_certificate_from_the_client_ca_is_served_others_are_refused() -> Result<()> {
    let node = NetNs::new("tls-mtls")?;
    let pki = Pki::new("mtls")?;
    let _agent = start_with_tls(&node, &pki).await?;
    let trusted = pki.trusted.pem();

    let client = leaf(
        &pki.trusted,
        "api-server",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    list_ports(&node, &trusted, Some(&client))
        .await
        .context("a client of the trusted CA")?;

    let rogue = ca("rogue")?;
    let stranger = leaf(&rogue, "api-server", ExtendedKeyUsagePurpose::ClientAuth)?;
    assert!(
        list_ports(&node, &trusted, Some(&stranger)).await.is_err(),
        "a certificate from another CA is refused"
    );
    assert!(
        list_ports(&node, &trusted, None).await.is_err(),
        "a client without a certificate is refused"
    );
    Ok(())
}

#[tokio::test]
async fn tcp_without_tls_needs_an_explicit_flag_and_is_warned_about() -> Result<()> {
    let node = NetNs::new("tls-insecure")?;
    let refused = Agent::start_with(&node, NODE, &["--grpc-tcp", ADDRESS]).await;
    let message = format!("{:#}", refused.err().context("started without TLS")?);
    assert!(
        message.contains("grpc_tcp needs mutual TLS"),
        "the refusal says why: {message}"
    );

    let agent =
        Agent::start_with(&node, NODE, &["--grpc-tcp", ADDRESS, "--grpc-tcp-insecure"]).await?;
    assert!(
        agent
            .logs()
            .contains("without authentication (grpc_tcp_insecure)"),
        "{}",
        agent.logs()
    );
    Ok(())
}

#[tokio::test]
async fn calls_beyond_the_request_rate_are_refused_until_it_allows_again() -> Result<()> {
    let node = NetNs::new("api-rate")?;
    let agent = Agent::start_with(&node, NODE, &["--max-requests-per-second", "5"]).await?;
    let mut client = agent.client().await?;
    // Starting up took some of the budget already; a burst of 30 exceeds the rest.
    let mut served = 0;
    let mut refused = 0;
    for _ in 0..30 {
        match client.list_ports(pb::ListRequest::default()).await {
            Ok(_) => served += 1,
            Err(status) if status.code() == tonic::Code::ResourceExhausted => refused += 1,
            Err(other) => anyhow::bail!("unexpected {other:?}"),
        }
    }
    assert!(
        served <= 6 && refused >= 24,
        "served {served}, refused {refused}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    client
        .list_ports(pb::ListRequest::default())
        .await
        .context("a second later the budget is back")?;
    Ok(())
}
