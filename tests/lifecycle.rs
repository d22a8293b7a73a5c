//! Health, reflection and graceful shutdown (in process, and with a real
//! SIGTERM to the real binary).

use std::time::{Duration, Instant};

use provisioning_gateway::mock::Scripted;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use provisioning_gateway::pb::association_service_client::AssociationServiceClient;

use crate::support::process::GatewayProcess;
use crate::support::{API_KEY, Opts, details, request, spawn_app, spawn_mock};

const SERVICE: &str = "infobip.provisioning.v1.AssociationService";
const OPERATIONS: &str = "google.longrunning.Operations";

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_service() {
    let app = spawn_app(Opts::default()).await;
    let mut health = HealthClient::new(app.channel().await);
    for service in ["", SERVICE, OPERATIONS] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            r.into_inner().status(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
}

#[tokio::test]
async fn reflection_lists_the_service_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let app = spawn_app(Opts::default()).await;
    let channel = app.channel().await;

    let mut c = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = c
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("no list")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&SERVICE.to_owned()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    assert!(names.contains(&OPERATIONS.to_owned()), "{names:?}");
    // The batch messages are described (grpcurl describe), with what they import.
    for symbol in [
        "infobip.provisioning.v1.BatchDeleteAssociationsRequest",
        "infobip.provisioning.v1.BatchDeleteAssociationsMetadata",
        "infobip.provisioning.v1.BatchDeleteAssociationsResponse",
        OPERATIONS,
    ] {
        let req = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1::server_reflection_request::MessageRequest::FileContainingSymbol(symbol.into()),
            ),
        };
        let mut stream = c
            .server_reflection_info(futures::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let answer = stream.message().await.unwrap().unwrap().message_response;
        let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
            answer
        else {
            panic!("{symbol} not described: {answer:?}")
        };
        let files: Vec<prost_types::FileDescriptorProto> = files
            .file_descriptor_proto
            .iter()
            .map(|b| prost::Message::decode(b.as_slice()).unwrap())
            .collect();
        let short = symbol.rsplit('.').next().unwrap();
        assert!(
            files
                .iter()
                .any(|f| f.message_type.iter().any(|m| m.name() == short)
                    || f.service.iter().any(|s| s.name() == short)),
            "{symbol} in none of {:?}",
            files.iter().map(|f| f.name()).collect::<Vec<_>>()
        );
    }

    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = c
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("no list")
    };
    assert!(list.service.iter().any(|s| s.name == SERVICE));
    assert!(list.service.iter().any(|s| s.name == OPERATIONS));
}

#[tokio::test]
async fn shutdown_finishes_in_flight_calls_and_answers_queued_ones() {
    let app = spawn_app(Opts {
        rate_per_second: 1,
        ..Opts::default()
    })
    .await;
    let client = app.client().await;
    let mut watch = HealthClient::new(app.channel().await)
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    // One call in flight upstream for 1.5 s, one queued behind it for the next slot.
    let mut slow = Scripted::new(204, "");
    slow.delay = Duration::from_millis(1500);
    app.mock.script([slow]);
    let mut c1 = client.clone();
    let in_flight = tokio::spawn(async move { c1.delete_association(request(0)).await });
    app.mock.wait_for_requests(1).await;
    let mut c2 = client.clone();
    let queued = tokio::spawn(async move { c2.delete_association(request(1)).await });
    // Its slot is ~1 s after the first; stop well before that.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    app.stop.cancel();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    drop(watch); // a Watch stream never ends by itself and would hold the drain to the grace

    let queued = queued.await.unwrap().unwrap_err();
    assert_eq!(queued.code(), Code::Unavailable);
    details::error_info_with(&queued, "SHUTTING_DOWN");
    in_flight
        .await
        .unwrap()
        .expect("the in-flight call finishes");
    app.server.await.unwrap().expect("clean shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "within the grace"
    );
}

#[tokio::test]
async fn sigterm_stops_the_binary_cleanly() {
    let (mock, mock_addr, _stop) = spawn_mock(20).await;
    let gateway = GatewayProcess::start(&format!("http://{mock_addr}"), &[]).await;
    let mut client = AssociationServiceClient::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();
    client.delete_association(request(0)).await.unwrap();
    assert_eq!(mock.arrivals().len(), 1);

    let (status, logs) = gateway.terminate().await;
    assert!(status.success(), "exit {status:?}; logs: {logs:?}");
    assert!(
        logs.iter().any(|l| l.contains("SIGTERM received")),
        "{logs:?}"
    );
    assert!(
        logs.iter().all(|l| !l.contains(API_KEY)),
        "the key leaked into a log"
    );
}
