//! The `kmsflow` binary: parses arguments, builds the runtime, wires the crates, renders
//! errors and chooses the exit code. Everything else lives in the workspace crates.

mod bundled;
mod check;
mod cli;
mod commands;
mod confirm;
mod daemon;
mod discover;
mod distribute;
mod failure;
mod output;
mod progress_view;
mod render;
mod rollout_view;
mod rollouts;
mod sandboxed;
mod signals;
mod state_file;
mod targets;
mod worker;

use std::process::ExitCode;

use clap::Parser;
use kmsflow_engine::Registry;
use kmsflow_steps::AzureConfig;

use crate::cli::{Cli, LogFormat};
use crate::failure::Failure;

/// Every step kind this build knows; Azure kinds reach Azure as `config` says, building
/// their client (and credential) only when a step first needs it.
pub fn registry_with(config: AzureConfig) -> Registry {
    let mut registry = Registry::with_engine_kinds();
    kmsflow_steps::register(&mut registry, kmsflow_steps::Azure::new(config));
    registry
}

/// The step kinds, for commands that only compile runbooks.
pub fn registry() -> Registry {
    registry_with(
        AzureConfig::new(
            "https://management.azure.com",
            kmsflow_steps::AuthMode::Auto,
        )
        .expect("the default endpoint is valid"),
    )
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    init_tracing(cli.log_format);
    output::set_json_logs(cli.log_format == LogFormat::Json);
    let sandbox = match sandboxed::prepare(&mut cli) {
        Ok(sandbox) => sandbox,
        Err(failure) => {
            report(&failure);
            return ExitCode::from(failure.exit_code());
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let result = runtime.block_on(async {
        // Kept alive until the command is done.
        let _sandbox = match sandbox.map(sandboxed::Prepared::start).transpose() {
            Ok(sandbox) => sandbox,
            Err(failure) => return Err(failure),
        };
        commands::dispatch(cli).await
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            report(&failure);
            ExitCode::from(failure.exit_code())
        }
    }
}

fn report(failure: &Failure) {
    match failure {
        Failure::Invalid(diagnostics) if output::json_logs() => {
            let line = serde_json::json!({
                "ts": render::now_rfc3339(),
                "level": "ERROR",
                "event": "invalid_runbook",
                "problems": diagnostics.to_json(),
            });
            eprintln!("{line}");
        }
        Failure::Invalid(diagnostics) => {
            eprint!(
                "{}",
                diagnostics.render(&miette::GraphicalReportHandler::new())
            );
            eprintln!("error: {diagnostics}");
        }
        // The run's own progress lines already said how it ended.
        Failure::RunEnded { .. } => {}
        other => {
            let mut message = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                message.push_str(&format!("\n  caused by: {cause}"));
                source = cause.source();
            }
            output::note_at("ERROR", format_args!("{message}"));
        }
    }
}

/// Log directives that hold whatever the user sets (a target directive wins over a level).
const QUIET_LIBRARIES: &[&str] = &[
    "handlebars=off",
    "azure_core=warn",
    "azure_identity=warn",
    "typespec_client_core=warn",
    "reqwest=warn",
    "hyper=warn",
    "hyper_util=warn",
    "h2=warn",
    "rustls=warn",
];

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KMSFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Libraries that log the values they handle stay quiet whatever KMSFLOW_LOG asks:
    // handlebars logs rendered templates (secret parameters in them) at debug, and the HTTP
    // and identity stacks log requests and token exchanges at debug and trace.
    let filter = QUIET_LIBRARIES.iter().fold(filter, |filter, directive| {
        filter.add_directive(directive.parse().expect("a valid directive"))
    });
    // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}
