//! The Quick start's demo, run as a user runs it (`leadflow demo`), twice against one database: each run ends with
//! its emails in the outbox and the purchase stopping one sequence.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use leadflow::Component;
use leadflow_tests::TestApp;

const LEADFLOW: &str = env!("CARGO_BIN_EXE_leadflow-under-test");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository")
        .to_path_buf()
}

fn emails_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                .count()
        })
        .unwrap_or(0)
}

async fn run_demo(app: &TestApp, outbox: &Path) -> String {
    let mut command = tokio::process::Command::new(LEADFLOW);
    command
        .args(["demo", "--dir", "deploy/demo", "--timeout", "60s"])
        .current_dir(repo_root())
        .kill_on_drop(true)
        .stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("LEADFLOW_") {
            command.env_remove(key);
        }
    }
    for (key, value) in app.env() {
        command.env(key, value);
    }
    command
        .env("LEADFLOW_HTTP_ADDR", "127.0.0.1:0")
        .env("LEADFLOW_SMTP_URL", format!("file://{}", outbox.display()));
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("the demo finished within 90 s")
        .expect("the demo ran");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "the demo failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_demo_delivers_its_emails_and_can_be_run_again() {
    // Only the API runs beside the demo: the demo runs every other service itself.
    let app = TestApp::spawn_with(&[Component::Api], &[]).await;
    // The test fixtures' own campaign would enroll the demo's leads too.
    leadflow_scheduler::campaigns::set_status(&app.db().await, "cart-recovery", false)
        .await
        .expect("deactivate the fixture campaign");
    let outbox = std::env::temp_dir().join(format!("leadflow-demo-{}", uuid::Uuid::new_v4().simple()));

    let first = run_demo(&app, &outbox).await;
    assert!(first.contains("7 follow-up emails sent."), "{first}");
    assert!(first.contains("cancelled (converted)"), "{first}");
    assert!(
        first.contains(&outbox.display().to_string()),
        "the demo says where the emails are:\n{first}"
    );
    assert_eq!(emails_in(&outbox), 7);

    let second = run_demo(&app, &outbox).await;
    assert!(second.contains("7 follow-up emails sent."), "{second}");
    assert_eq!(emails_in(&outbox), 14);

    let _ = std::fs::remove_dir_all(&outbox);
    app.stop().await;
}
