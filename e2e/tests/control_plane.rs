//! The test control plane itself: a real kube-apiserver 1.20.2 with RBAC answers, and refuses
//! what RBAC does not allow.

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Api;
use kube::api::PostParams;
use kvfleet_e2e::control_plane::ControlPlane;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_api_server_serves_and_enforces_rbac() {
    let plane = ControlPlane::start("system:serviceaccount:default:nobody");
    let admin = plane.admin().await;
    let version = admin.apiserver_version().await.expect("/version");
    assert_eq!(version.git_version, "v1.20.2");
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    assert!(
        namespaces
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some("default"))
    );

    // A ServiceAccount with no role: its bound token authenticates, and RBAC refuses it.
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
    let account = ServiceAccount {
        metadata: kube::api::ObjectMeta { name: Some("nobody".into()), ..Default::default() },
        ..Default::default()
    };
    accounts.create(&PostParams::default(), &account).await.expect("create a ServiceAccount");
    let request = TokenRequest {
        spec: Some(k8s_openapi::api::authentication::v1::TokenRequestSpec {
            audiences: Some(vec![plane.audience().to_string()]),
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = accounts.create_token_request("nobody", &PostParams::default(), &request).await.expect("a token");
    let token = token.status.and_then(|s| s.token).expect("a token in the status");
    let kubeconfig = plane.write_kubeconfig("nobody.kubeconfig", &token);
    let nobody = plane.client_for(&kubeconfig).await;
    let refused = Api::<Namespace>::all(nobody).list(&Default::default()).await.unwrap_err();
    assert!(matches!(&refused, kube::Error::Api(status) if status.code == 403), "{refused:?}");
    // The API server writes its audit event as the request ends, not always before the answer.
    let started = std::time::Instant::now();
    while !plane.audit_log().contains("system:serviceaccount:default:nobody") {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the audit log records the account");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
