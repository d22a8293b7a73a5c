//! A command line that clap refuses, as the one line `main` prints before
//! exiting with status 2: `provisioning-gateway: <setting>: <problem>`.
//! clap's own rendering (the problem, usage, a hint to try `--help`) spans
//! several lines; a log collector then shows the first line alone, which
//! often names no setting.
//!
//! The line is built from the error's context, never from clap's rendered
//! text, so a refused value is echoed only where that is safe: never for an
//! argument whose values are hidden (`--redis-url`, which may hold a
//! password), and never the `=value` part of an unknown `--flag=value`.

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, Command, CommandFactory};

use super::Cli;

/// What `main` does with an error of `Cli::try_parse`: `None` where
/// clap's own output is the answer (`--help`, `--version`, or no
/// subcommand: print it as clap does and exit with clap's status), else the
/// one line (without a newline) to print on stderr before exiting with
/// status 2. `args` is the command line the error came from.
pub fn refusal(error: &clap::Error, args: &[OsString]) -> Option<String> {
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return None;
    }
    let cli = Cli::command();
    let command = subcommand(&cli, args);
    let reported = strings(error.get(ContextKind::InvalidArg));
    let args: Vec<Option<&Arg>> = reported.iter().map(|r| find(command, r)).collect();
    let mut setting = reported
        .iter()
        .zip(&args)
        .map(|(r, arg)| name(r, *arg))
        .collect::<Vec<_>>()
        .join(", ");
    // Values of the (first) refused argument may be shown unless it hides them.
    let hidden = args
        .first()
        .copied()
        .flatten()
        .is_some_and(Arg::is_hide_env_values_set);
    let value = one(error.get(ContextKind::InvalidValue));
    let problem = match error.kind() {
        ErrorKind::InvalidValue if value.is_none_or(str::is_empty) => "needs a value".to_owned(),
        ErrorKind::InvalidValue => {
            let mut p = invalid_value(value, hidden);
            let valid = strings(error.get(ContextKind::ValidValue));
            if !valid.is_empty() {
                p.push_str(&format!("; possible values: {}", valid.join(", ")));
            }
            p
        }
        ErrorKind::ValueValidation => {
            let mut p = invalid_value(value, hidden);
            if let Some(source) = std::error::Error::source(error).filter(|_| !hidden) {
                p.push_str(&format!(": {}", one_line(&source.to_string())));
            }
            p
        }
        ErrorKind::UnknownArgument => {
            let mut p = "unknown argument".to_owned();
            if let Some(suggested) = one(error.get(ContextKind::SuggestedArg)) {
                p.push_str(&format!("; did you mean '{}'?", flag(suggested)));
            }
            p
        }
        ErrorKind::MissingRequiredArgument => "is required with the settings given".to_owned(),
        ErrorKind::ArgumentConflict => {
            let prior = strings(error.get(ContextKind::PriorArg));
            let prior: Vec<String> = prior
                .iter()
                .filter(|p| flag(p) != reported.first().map_or("", |r| flag(r)))
                .map(|p| name(p, find(command, p)))
                .collect();
            if prior.is_empty() {
                "given more than once".to_owned()
            } else {
                format!("cannot be used with {}", prior.join(", "))
            }
        }
        ErrorKind::InvalidSubcommand => {
            setting = one(error.get(ContextKind::InvalidSubcommand))
                .unwrap_or_default()
                .to_owned();
            let mut p = "unknown subcommand".to_owned();
            let suggested = strings(error.get(ContextKind::SuggestedSubcommand));
            if let Some(s) = suggested.first() {
                p.push_str(&format!("; did you mean '{s}'?"));
            }
            p
        }
        ErrorKind::InvalidUtf8 => "not valid UTF-8".to_owned(),
        ErrorKind::TooManyValues | ErrorKind::TooFewValues | ErrorKind::WrongNumberOfValues => {
            "wrong number of values".to_owned()
        }
        ErrorKind::NoEquals => "needs '=' before its value".to_owned(),
        kind => kind.as_str().unwrap_or("refused").to_owned(),
    };
    if setting.is_empty() {
        setting = "command line".to_owned();
    }
    Some(format!("provisioning-gateway: {setting}: {problem}"))
}

/// The subcommand being parsed: the first word of the command line that is
/// not a flag (the top level has none but `--help` and `--version`).
fn subcommand<'a>(cli: &'a Command, args: &[OsString]) -> &'a Command {
    args.iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find(|a| !a.starts_with('-'))
        .and_then(|a| cli.find_subcommand(a))
        .unwrap_or(cli)
}

/// The argument clap reports (`--max-wait <MAX_WAIT>`) in `command`.
fn find<'a>(command: &'a Command, reported: &str) -> Option<&'a Arg> {
    let long = flag(reported).strip_prefix("--")?;
    command.get_arguments().find(|a| a.get_long() == Some(long))
}

/// How a setting is named: its flag, and its variable where it has one
/// (the value may have come from either).
fn name(reported: &str, arg: Option<&Arg>) -> String {
    let flag = flag(reported);
    match arg.and_then(Arg::get_env) {
        Some(env) => format!("{flag} ({})", env.to_string_lossy()),
        None => flag.to_owned(),
    }
}

/// `--max-wait` of `--max-wait <MAX_WAIT>`, or of `--max-wai=5s` (never
/// the value).
fn flag(reported: &str) -> &str {
    reported
        .split([' ', '='])
        .next()
        .unwrap_or(reported)
        .trim_matches('\'')
}

fn invalid_value(value: Option<&str>, hidden: bool) -> String {
    match value {
        Some(v) if !hidden => format!("invalid value '{}'", one_line(v)),
        _ => "invalid value".to_owned(),
    }
}

/// `s` on one line (a value may hold a newline).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn one(value: Option<&ContextValue>) -> Option<&str> {
    match value {
        Some(ContextValue::String(s)) => Some(s),
        Some(ContextValue::Strings(v)) => v.first().map(String::as_str),
        _ => None,
    }
}

fn strings(value: Option<&ContextValue>) -> Vec<String> {
    match value {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn line(args: &[&str]) -> Option<String> {
        let args: Vec<OsString> = std::iter::once("provisioning-gateway")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let error = Cli::try_parse_from(&args).expect_err("refused");
        refusal(&error, &args)
    }

    fn refused(args: &[&str]) -> String {
        line(args).expect("a refusal, not clap's own output")
    }

    #[test]
    fn each_refusal_is_one_line_naming_the_flag_and_its_variable() {
        for (args, want) in [
            (
                &["serve", "--max-wait", "soon"][..],
                "provisioning-gateway: --max-wait (GATEWAY_MAX_WAIT): invalid value 'soon': ",
            ),
            (
                &["serve", "--listen", "nowhere"],
                "provisioning-gateway: --listen (GATEWAY_LISTEN): invalid value 'nowhere': invalid socket address syntax",
            ),
            (
                &["serve", "--budget-backend", "etcd"],
                "provisioning-gateway: --budget-backend (GATEWAY_BUDGET_BACKEND): invalid value 'etcd'; possible values: memory, redis",
            ),
            (
                &["serve", "--max-queue", "lots"],
                "provisioning-gateway: --max-queue (GATEWAY_MAX_QUEUE): invalid value 'lots': invalid digit",
            ),
            (
                &["serve", "--max-wait"],
                "provisioning-gateway: --max-wait (GATEWAY_MAX_WAIT): needs a value",
            ),
            (
                &["serve", "--max-wiat", "5s"],
                "provisioning-gateway: --max-wiat: unknown argument; did you mean '--max-wait'?",
            ),
            (
                &["serve", "--tls-cert", "/c.pem"],
                "provisioning-gateway: --tls-key (GATEWAY_TLS_KEY): is required with the settings given",
            ),
            (
                &[
                    "serve",
                    "--listen",
                    "127.0.0.1:1",
                    "--listen",
                    "127.0.0.1:2",
                ],
                "provisioning-gateway: --listen (GATEWAY_LISTEN): given more than once",
            ),
            (
                &["mock-upstream", "--listen", "nowhere"],
                "provisioning-gateway: --listen (MOCK_LISTEN): invalid value 'nowhere'",
            ),
            (
                &["demo", "--listen", "nowhere"],
                "provisioning-gateway: --listen: invalid value 'nowhere'",
            ),
            (
                &["serv"],
                "provisioning-gateway: serv: unknown subcommand; did you mean 'serve'?",
            ),
        ] {
            let got = refused(args);
            assert!(got.starts_with(want), "{args:?}: {got:?}, not {want:?}…");
            assert!(!got.contains('\n'), "{args:?}: {got:?}");
        }
    }

    #[test]
    fn a_redis_url_is_never_echoed() {
        for args in [
            &["serve", "--redis-ur=redis://:s3cr3t@r:6379"][..],
            &["serve", "--redis-url"],
        ] {
            let got = refused(args);
            assert!(!got.contains("s3cr3t"), "{got}");
            assert!(got.contains("--redis-ur"), "{got}");
        }
    }

    #[test]
    fn help_and_version_are_clap_s_own() {
        for args in [&["--help"][..], &["--version"], &["serve", "--help"], &[]] {
            assert_eq!(line(args), None, "{args:?}");
        }
    }
}
