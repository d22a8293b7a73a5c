//! Bad configuration: the real binary exits non-zero before binding, with one
//! line naming the setting, no panic, no backtrace.

use std::process::Command;

fn serve(env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_provisioning-gateway"));
    cmd.env_clear()
        .env("RUST_BACKTRACE", "1")
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn each_bad_setting_is_named_in_one_line() {
    let url = ("INFOBIP_BASE_URL", "https://example.invalid");
    let key = ("INFOBIP_API_KEY", "k");
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: &[Case] = &[
        (&[key], &[], "INFOBIP_BASE_URL"),
        (&[url], &[], "INFOBIP_API_KEY"),
        (
            &[("INFOBIP_BASE_URL", "not a url"), key],
            &[],
            "INFOBIP_BASE_URL",
        ),
        (
            &[url, key],
            &["--rate-per-second", "0"],
            "--rate-per-second",
        ),
        (&[url, key], &["--burst", "0"], "--burst"),
        (&[url, key], &["--max-queue", "0"], "--max-queue"),
        (
            &[url],
            &["--api-key-file", "/nonexistent/key"],
            "--api-key-file",
        ),
        (&[url, key], &["--max-wait", "soon"], "--max-wait"),
        (&[url, key], &["--listen", "nowhere"], "--listen"),
        (&[url, key], &["--budget-backend", "redis"], "--redis-url"),
        (
            &[url, key, ("GATEWAY_BUDGET_BACKEND", "redis")],
            &["--redis-url", "http://redis:6379"],
            "--redis-url",
        ),
        (
            &[url, key, ("GATEWAY_REDIS_URL", "redis://redis:6379")],
            &[],
            "--redis-url",
        ),
        (
            &[url, key],
            &["--budget-backend", "etcd"],
            "--budget-backend",
        ),
        (
            &[url, key],
            &["--redis-fallback", "hope", "--budget-backend", "redis"],
            "--redis-fallback",
        ),
        (
            &[url, key],
            &["--expected-replicas", "0"],
            "--expected-replicas",
        ),
        (
            &[url, key],
            &["--account-name", "two words"],
            "--account-name",
        ),
        (
            &[url, key],
            &[
                "--budget-backend",
                "redis",
                "--redis-url",
                "redis://r:6379",
                "--redis-key-prefix",
                "",
            ],
            "--redis-key-prefix",
        ),
        (
            &[url, key],
            &[
                "--budget-backend",
                "redis",
                "--redis-url",
                "redis+sentinel://s1:26379,s2:26379",
            ],
            "--redis-url",
        ),
        (
            &[url, key],
            &[
                "--budget-backend",
                "redis",
                "--redis-url",
                "redis://:pw@r:6379",
                "--redis-password-file",
                "/etc/hostname",
            ],
            "--redis-password-file",
        ),
        (
            &[url, key],
            &[
                "--budget-backend",
                "redis",
                "--redis-url",
                "redis://r:6379",
                "--redis-password-file",
                "/nonexistent/redis-password",
            ],
            "--redis-password-file",
        ),
        (
            &[url, key],
            &[
                "--budget-backend",
                "redis",
                "--redis-url",
                "redis+cluster://n1:7000",
                "--redis-sentinel-password-file",
                "/etc/hostname",
            ],
            "--redis-sentinel-password-file",
        ),
        (
            &[url, key],
            &["--redis-username", "app"],
            "--redis-username",
        ),
    ];
    for (env, args, setting) in cases {
        let (code, stderr) = serve(env, args);
        assert_ne!(code, 0, "{setting}: {stderr}");
        assert!(stderr.contains(setting), "{setting} not named in: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }
}

#[test]
fn help_lists_every_serve_flag_with_its_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_provisioning-gateway"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "GATEWAY_LISTEN",
        "GATEWAY_METRICS_LISTEN",
        "INFOBIP_BASE_URL",
        "INFOBIP_API_KEY_FILE",
        "GATEWAY_RATE_PER_SECOND",
        "GATEWAY_BURST",
        "GATEWAY_SAFETY_MARGIN",
        "GATEWAY_MAX_WAIT",
        "GATEWAY_MAX_QUEUE",
        "GATEWAY_UPSTREAM_TIMEOUT",
        "GATEWAY_UPSTREAM_RESERVE",
        "GATEWAY_SHUTDOWN_GRACE",
        "GATEWAY_ACCOUNT_NAME",
        "GATEWAY_BUDGET_BACKEND",
        "GATEWAY_REDIS_URL",
        "GATEWAY_REDIS_KEY_PREFIX",
        "GATEWAY_REDIS_FALLBACK",
        "GATEWAY_EXPECTED_REPLICAS",
        "GATEWAY_REDIS_PASSWORD_FILE",
        "GATEWAY_REDIS_USERNAME",
        "GATEWAY_REDIS_SENTINEL_PASSWORD_FILE",
        "GATEWAY_REDIS_CA_FILE",
    ] {
        assert!(help.contains(var), "{var} missing from serve --help");
    }
}

#[test]
fn a_redis_password_never_shows_in_errors_or_help() {
    let url = ("INFOBIP_BASE_URL", "https://example.invalid");
    let key = ("INFOBIP_API_KEY", "k");
    for redis_url in [
        "redis://:s3cr3t-pw@redis:notaport",
        "redis://user:s3cr3t-pw@redis:6379/notadb",
        "http://:s3cr3t-pw@redis:6379",
    ] {
        let (code, stderr) = serve(
            &[url, key, ("GATEWAY_REDIS_URL", redis_url)],
            &["--budget-backend", "redis"],
        );
        assert_ne!(code, 0, "{stderr}");
        assert!(stderr.contains("--redis-url"), "{stderr}");
        assert!(!stderr.contains("s3cr3t"), "password leaked: {stderr}");
    }
    let help = Command::new(env!("CARGO_BIN_EXE_provisioning-gateway"))
        .args(["serve", "--help"])
        .env("GATEWAY_REDIS_URL", "redis://:s3cr3t-pw@redis:6379")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(!help.contains("s3cr3t"), "password in --help: {help}");
}

#[test]
fn a_bad_accounts_file_is_refused_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("accounts.toml");
    std::fs::write(
        &file,
        "[[accounts]]\nname = \"main\"\nbase_url = \"https://x.example\"\napi_key_file = \"/k\"\nrate_per_second = 0\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (code, stderr) = serve(&[("GATEWAY_ACCOUNTS_FILE", path)], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{path}:5: accounts.rate_per_second: must be at least 1"
        )),
        "{stderr}"
    );
    std::fs::write(
        &file,
        "[[accounts]]\nname = \"main\"\nbase_url = \"https://x.example\"\napi_key = \"inline\"\n",
    )
    .unwrap();
    let (_, stderr) = serve(&[("GATEWAY_ACCOUNTS_FILE", path)], &[]);
    assert!(
        stderr.contains(&format!("{path}:4: api_key: unknown field")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("inline"),
        "the refused value is not echoed: {stderr}"
    );
}
