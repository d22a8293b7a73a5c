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
        // Out of range: refused before anything binds, never a panic later
        // (a --max-wait near the limit once overflowed the default deadline).
        (
            &[url, key],
            &["--max-wait", "18446744073709551615s"],
            "--max-wait",
        ),
        (&[url, key], &["--max-wait", "25h"], "--max-wait"),
        (
            &[url, key],
            &["--rate-per-second", "1001"],
            "--rate-per-second",
        ),
        (&[url, key], &["--burst", "1000000001"], "--burst"),
        (&[url, key], &["--max-queue", "1000001"], "--max-queue"),
        (&[url, key], &["--safety-margin", "11s"], "--safety-margin"),
        (
            &[url, key],
            &["--upstream-reserve", "61s"],
            "--upstream-reserve",
        ),
        (
            &[url, key],
            &["--upstream-timeout", "500000000years"],
            "--upstream-timeout",
        ),
        (
            &[url, key],
            &["--shutdown-grace", "11m"],
            "--shutdown-grace",
        ),
        (
            &[url, key],
            &["--operation-retention", "0s"],
            "--operation-retention",
        ),
        (
            &[url, key, ("GATEWAY_OPERATION_RETENTION", "400days")],
            &[],
            "--operation-retention",
        ),
        (
            &[url, key],
            &["--operation-retention", "a while"],
            "--operation-retention",
        ),
        (
            &[url, key],
            &["--expected-replicas", "1001"],
            "--expected-replicas",
        ),
        // The API key never crosses a network in clear unless asked to.
        (
            &[("INFOBIP_BASE_URL", "http://example.invalid"), key],
            &[],
            "--insecure-upstream",
        ),
        (
            &[url, key],
            &["--upstream-proxy", "socks5://proxy:1080"],
            "--upstream-proxy",
        ),
    ];
    for (env, args, setting) in cases {
        let (code, stderr) = serve(env, args);
        assert_eq!(code, 2, "{setting}: exit status 2, got {code}: {stderr}");
        let line = one_line(&stderr);
        assert!(
            line.starts_with("provisioning-gateway: "),
            "{setting}: {line}"
        );
        assert!(line.contains(setting), "{setting} not named in: {line}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }
}

/// The only line of `stderr`, which must be exactly one non-empty line.
fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty() && stderr.ends_with('\n'),
        "not exactly one non-empty line: {stderr:?}"
    );
    lines[0]
}

#[test]
fn help_and_version_still_print_and_exit_zero() {
    for (args, shows) in [
        (&["--help"][..], "serve"),
        (&["serve", "--help"], "--max-wait"),
        (&["mock-upstream", "--help"], "--api-key"),
        (&["--version"], env!("CARGO_PKG_VERSION")),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_provisioning-gateway"))
            .env_clear()
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert!(stdout.contains(shows), "{args:?}: {stdout}");
        assert!(out.stderr.is_empty(), "{args:?}: {out:?}");
    }
}

#[test]
fn help_lists_every_serve_flag_with_its_variable() {
    use clap::CommandFactory;
    let out = Command::new(env!("CARGO_BIN_EXE_provisioning-gateway"))
        .env_clear()
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    // The source of truth: every argument of `serve` as clap knows it.
    let cli = provisioning_gateway::cli::Cli::command();
    let serve = cli.find_subcommand("serve").expect("a serve subcommand");
    let table = settings_table();
    let mut variables = Vec::new();
    for arg in serve.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" {
            continue;
        }
        let flag = format!("--{long}");
        let var = arg
            .get_env()
            .unwrap_or_else(|| panic!("{flag} has no environment variable"))
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            help.contains(&format!("[env: {var}")),
            "{var} ({flag}) missing from serve --help:\n{help}"
        );
        let row = table
            .iter()
            .find(|(_, vars)| vars.contains(&var))
            .unwrap_or_else(|| panic!("{var} missing from README's settings table"));
        assert!(
            row.0.contains(&flag),
            "README's row of {var} does not name {flag}: {row:?}"
        );
        variables.push(var);
    }
    assert!(variables.len() >= 25, "only {variables:?}");
    // And the table names nothing that is not a setting (the API key alone
    // is read from the environment only, by main).
    for (_, vars) in &table {
        for var in vars {
            assert!(
                variables.contains(var) || var == "INFOBIP_API_KEY",
                "README's settings table names {var}, which serve does not read"
            );
        }
    }
}

/// README's table of `serve` settings: per row, the flag cell and the
/// variables named in the variable cell.
fn settings_table() -> Vec<(String, Vec<String>)> {
    const README: &str = include_str!("../README.md");
    let mut rows = README
        .lines()
        .skip_while(|l| !l.starts_with("| flag | variable |"))
        .skip(2) // the header and its rule
        .take_while(|l| l.starts_with('|'))
        .peekable();
    assert!(rows.peek().is_some(), "no settings table in README");
    rows.map(|row| {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let vars = cells[2]
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        (cells[1].to_owned(), vars)
    })
    .collect()
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
    // Far above any vendor's rate (once a panic with a zero margin).
    std::fs::write(
        &file,
        "[[accounts]]\nname = \"main\"\nbase_url = \"https://x.example\"\napi_key_file = \"/k\"\nrate_per_second = 4000000000\n",
    )
    .unwrap();
    let (code, stderr) = serve(
        &[("GATEWAY_ACCOUNTS_FILE", path)],
        &["--safety-margin", "0ms"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{path}:5: accounts.rate_per_second: must be at most 1000"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
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
