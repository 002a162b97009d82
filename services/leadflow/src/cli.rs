//! The command line: `leadflow run | migrate | apply | campaigns | codes | stats | keys | suppressions | leads |
//! lists | demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use leadflow_shared::config::{Config, Source};
use leadflow_shared::{db, service, telemetry};

use crate::Component;

#[derive(Parser)]
#[command(
    name = "leadflow",
    version,
    about = "Lead nurturing: events in, timed follow-up emails out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    api: crate::leads_cli::ApiArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run services: all of them in one process (the default), or the ones named.
    Run {
        #[arg(value_enum)]
        components: Vec<Component>,
    },
    /// Apply pending database migrations (run once per release, e.g. as a Kubernetes Job).
    Migrate,
    /// Apply campaigns (*.yaml) and template folders (<name>/<lang>/subject.hbs ...) from files.
    Apply {
        /// A campaign file, or a folder searched for campaign files and template folders.
        #[arg(short = 'f', long = "file", required = true)]
        paths: Vec<PathBuf>,
    },
    /// Campaigns in the database.
    Campaigns {
        #[command(subcommand)]
        action: CampaignAction,
    },
    /// Installation-wide settings: the send switch, staleness limit, attribution window, minimum delays.
    Settings {
        #[command(subcommand)]
        action: SettingsAction,
    },
    /// Per-lead discount codes: import a pool of codes for a step, count codes per step.
    Codes {
        #[command(subcommand)]
        action: CodesAction,
    },
    /// Follow-ups sent, cancelled and converted, and revenue, per campaign and step.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Per A/B variant and holdout group: rates with 95% intervals, significance, lift, the winner.
        #[arg(long)]
        variants: bool,
    },
    /// API keys of the admin REST API (`Authorization: Bearer <key>`).
    Keys {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// The suppression list: addresses never mailed, everywhere or by one campaign.
    Suppressions {
        #[command(subcommand)]
        action: SuppressionAction,
    },
    /// Lead records, through the HTTP API (LEADFLOW_API_URL, LEADFLOW_API_KEY): show, create, update, search,
    /// timeline, notes, merge, import and export, custom fields, personal data export and erasure.
    Leads {
        #[command(subcommand)]
        action: crate::leads_cli::LeadAction,
    },
    /// Static lists and saved filters (segments), through the HTTP API; usable as campaign audiences.
    Lists {
        #[command(subcommand)]
        action: crate::leads_cli::ListAction,
    },
    /// Set up the demo data, run every service, send sample events, and show the emails that came out.
    Demo {
        /// Folder with campaigns, templates, events.json and conversion.json.
        #[arg(long, default_value = "deploy/demo")]
        dir: PathBuf,
        /// Give up when the demo's emails are not final by then.
        #[arg(long, default_value = "120s")]
        timeout: String,
    },
    /// Print the OpenAPI 3.1 document of the HTTP API (the one served at /v1/openapi.json).
    Openapi {
        /// YAML instead of JSON.
        #[arg(long)]
        yaml: bool,
    },
}

#[derive(Subcommand)]
enum SettingsAction {
    /// Every setting with its value.
    Get,
    /// Change a setting, e.g. `sending_enabled false` or `min_delay.order.unfinished 1h`.
    Set { key: String, value: String },
}

#[derive(Subcommand)]
enum CodesAction {
    /// Add codes to the pool of a campaign step (`code: pool`): one per line, or the first column of a CSV.
    /// Bad lines are reported by number; the good ones are imported all the same.
    Import {
        #[arg(long)]
        campaign: String,
        #[arg(long, default_value = "A")]
        variant: String,
        #[arg(long)]
        step: i16,
        /// The file of codes.
        file: PathBuf,
    },
    /// Free, assigned and redeemed codes per step of a campaign.
    List {
        #[arg(long)]
        campaign: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Create a key and print it; it is shown this once and stored only as a hash.
    Create {
        /// What the key is for, e.g. `ci` or `marketing-dashboard`.
        #[arg(long)]
        name: String,
        /// read (GET requests), write (also campaigns and templates) or admin (also settings); repeatable.
        #[arg(long = "scope", required = true, value_parser = leadflow_api::keys::Scope::parse)]
        scopes: Vec<leadflow_api::keys::Scope>,
    },
    /// Every key with its prefix, scopes and when it was last used; never the key itself.
    List,
    /// Refuse a key from now on, named by its prefix (the first 8 characters, as `keys list` shows).
    Revoke { prefix: String },
}

#[derive(Subcommand)]
enum SuppressionAction {
    /// Entries, newest first (the address, or its hash once erased).
    List {
        /// Only this address (or the hex hash of one).
        #[arg(long)]
        email: Option<String>,
        /// Only this reason: manual, bounced, complained, unsubscribed, suspended or erased.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value_t = leadflow_api::consent::DEFAULT_LIMIT)]
        limit: i64,
        /// The id of the last entry of the previous page.
        #[arg(long)]
        after: Option<i64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Suppress an address (it need not be a lead); its open follow-ups end at once.
    Add {
        email: String,
        /// manual, bounced, complained, unsubscribed or suspended.
        #[arg(long, default_value = "manual")]
        reason: String,
        /// Only for this campaign.
        #[arg(long)]
        campaign: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
    /// Resubscribe an address: lifts its suppression, recording why.
    Remove {
        email: String,
        /// Why the address may be mailed again (kept in the suppression log).
        #[arg(long, required = true)]
        reason: String,
        /// The campaign's entry instead of the global one.
        #[arg(long)]
        campaign: Option<String>,
    },
    /// Suppress every address of a file: `email[,reason[,note]]` per line. Bad lines are reported by number;
    /// the good ones are applied all the same.
    Import {
        file: PathBuf,
        /// Only for this campaign.
        #[arg(long)]
        campaign: Option<String>,
    },
}

#[derive(Subcommand)]
enum CampaignAction {
    /// List campaigns with their steps.
    List,
    /// Start enrolling leads in a campaign.
    Activate { name: String },
    /// Stop enrolling leads in a campaign; pending follow-ups are cancelled (reason: campaign stopped).
    Deactivate { name: String },
}

/// Runs the command line of the current process.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&Source::from_env()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("leadflow: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("leadflow: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, cli.api, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leadflow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command, api: crate::leads_cli::ApiArgs, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Run { components } => {
            telemetry::init_logging(&config.log);
            let listener = TcpListener::bind(config.http.addr)
                .await
                .with_context(|| format!("LEADFLOW_HTTP_ADDR: cannot listen on {}", config.http.addr))?;
            let shutdown = CancellationToken::new();
            service::shutdown_on_signals(shutdown.clone());
            let running = crate::start(config, &components, listener, shutdown).await?;
            tracing::info!(addr = %running.addr, "listening");
            running.wait().await
        }
        Command::Migrate => {
            telemetry::init_logging(&config.log);
            let pool = db::pool(&config.database)?;
            let applied = db::migrate(&pool).await?;
            println!(
                "migrations applied: {}",
                if applied.is_empty() {
                    "none (up to date)".to_string()
                } else {
                    format!("{applied:?}")
                }
            );
            let installed = crate::defaults::install(&pool).await?;
            for t in &installed.templates {
                println!("default template {t} installed");
            }
            for c in &installed.campaigns {
                println!("default campaign {c} installed (inactive)");
            }
            Ok(())
        }
        Command::Apply { paths } => {
            let pool = db::pool(&config.database)?;
            db::check_schema(&pool).await?;
            for path in paths {
                let report = crate::apply::apply_path(&pool, &path).await?;
                print!("{report}");
            }
            Ok(())
        }
        Command::Campaigns { action } => {
            let pool = db::pool(&config.database)?;
            db::check_schema(&pool).await?;
            let client = pool.get().await?;
            match action {
                CampaignAction::List => {
                    for c in leadflow_scheduler::campaigns::list(&client).await? {
                        println!(
                            "{:<28} {:<9} {:<20} {}",
                            c.name,
                            c.status,
                            c.lead_source,
                            c.steps.join(" | ")
                        );
                    }
                }
                CampaignAction::Activate { name } => {
                    leadflow_scheduler::campaigns::set_status(&client, &name, true).await?;
                    println!("campaign {name} active");
                }
                CampaignAction::Deactivate { name } => {
                    let cancelled = leadflow_scheduler::campaigns::set_status(&client, &name, false).await?;
                    println!("campaign {name} inactive; {cancelled} pending follow-ups cancelled");
                }
            }
            Ok(())
        }
        Command::Settings { action } => {
            let pool = db::pool(&config.database)?;
            db::check_schema(&pool).await?;
            let client = pool.get().await?;
            match action {
                SettingsAction::Get => {
                    for (key, value) in leadflow_shared::settings::all(&client).await? {
                        println!("{key:<32} {value}");
                    }
                }
                SettingsAction::Set { key, value } => {
                    let stored = leadflow_shared::settings::set(&client, &key, &value).await?;
                    println!("{key} = {stored}");
                }
            }
            Ok(())
        }
        Command::Stats { json, variants } => {
            let pool = db::pool(&config.database)?;
            db::check_schema(&pool).await?;
            let client = pool.get().await?;
            if variants {
                let rows = leadflow_scheduler::abtest::variant_stats(&client).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    print!("{}", leadflow_scheduler::abtest::table(&rows));
                }
                return Ok(());
            }
            let rows = leadflow_scheduler::stats::campaign_stats(&client).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", leadflow_scheduler::stats::table(&rows));
            }
            Ok(())
        }
        Command::Codes { action } => {
            let pool = db::pool(&config.database)?;
            db::check_schema(&pool).await?;
            let client = pool.get().await?;
            match action {
                CodesAction::Import {
                    campaign,
                    variant,
                    step,
                    file,
                } => {
                    let text =
                        std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
                    let report = leadflow_scheduler::codes::import(&client, &campaign, &variant, step, &text).await?;
                    print!("{report}");
                    if !report.rejected.is_empty() {
                        anyhow::bail!(
                            "{} line(s) of {} rejected; the other codes were imported",
                            report.rejected.len(),
                            file.display()
                        );
                    }
                }
                CodesAction::List { campaign, json } => {
                    let rows = leadflow_scheduler::codes::list(&client, &campaign).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&rows)?);
                    } else {
                        print!("{}", leadflow_scheduler::codes::table(&rows));
                    }
                }
            }
            Ok(())
        }
        Command::Keys { action } => {
            let pool = db::pool(&config.database)?;
            db::check_schema(&pool).await?;
            let client = pool.get().await?;
            match action {
                KeyAction::Create { name, scopes } => {
                    use secrecy::ExposeSecret as _;
                    let created = leadflow_api::keys::create(&client, &name, &scopes).await?;
                    let scopes: Vec<&str> = created.info.scopes.iter().map(|s| s.as_str()).collect();
                    eprintln!(
                        "key {} ({}) created with scope {}; it is not shown again:",
                        created.info.prefix,
                        created.info.name,
                        scopes.join(", ")
                    );
                    println!("{}", created.key.expose_secret());
                }
                KeyAction::List => {
                    println!(
                        "{:<10} {:<24} {:<18} {:<17} {:<17} revoked",
                        "prefix", "name", "scopes", "created", "last used"
                    );
                    for k in leadflow_api::keys::list(&client).await? {
                        let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str()).collect();
                        println!(
                            "{:<10} {:<24} {:<18} {:<17} {:<17} {}",
                            k.prefix,
                            k.name,
                            scopes.join(","),
                            k.created_at.format("%Y-%m-%d %H:%M").to_string(),
                            k.last_used_at
                                .map_or("-".to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string()),
                            k.revoked_at
                                .map_or("-".to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string())
                        );
                    }
                }
                KeyAction::Revoke { prefix } => {
                    let key = leadflow_api::keys::revoke(&client, &prefix).await?;
                    println!("key {} ({}) revoked", key.prefix, key.name);
                }
            }
            Ok(())
        }
        Command::Suppressions { action } => suppressions(action, &config).await,
        Command::Leads { action } => crate::leads_cli::run(action, &api.client(config.http.addr)?).await,
        Command::Lists { action } => crate::leads_cli::lists(action, &api.client(config.http.addr)?).await,
        Command::Demo { dir, timeout } => {
            let timeout = leadflow_shared::domain::parse_delay(&timeout).context("--timeout")?;
            crate::demo::run(config, &dir, timeout).await
        }
        Command::Openapi { yaml } => {
            let doc = leadflow_api::openapi::document().map_err(|e| anyhow::anyhow!(e))?;
            if yaml {
                print!("{}", serde_yaml_ng::to_string(&doc)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
            Ok(())
        }
    }
}

/// Who a command-line change is recorded as: `cli:<user>`.
fn cli_actor() -> String {
    match std::env::var("USER").or_else(|_| std::env::var("USERNAME")) {
        Ok(user) if !user.trim().is_empty() => format!("cli:{}", user.trim()),
        _ => "cli".to_string(),
    }
}

async fn suppressions(action: SuppressionAction, config: &Config) -> anyhow::Result<()> {
    use leadflow_api::consent;

    let pool = db::pool(&config.database)?;
    db::check_schema(&pool).await?;
    let mut client = pool.get().await?;
    match action {
        SuppressionAction::List {
            email,
            reason,
            limit,
            after,
            json,
        } => {
            let filter = consent::SuppressionFilter {
                email,
                reason,
                limit: Some(limit),
                after,
            };
            let page = consent::list(&client, &filter).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&page)?);
                return Ok(());
            }
            println!(
                "{:<8} {:<40} {:<13} {:<20} {:<18} {:<17} note",
                "id", "email", "reason", "campaign", "source", "created"
            );
            for e in &page.items {
                let who = e
                    .email
                    .clone()
                    .unwrap_or_else(|| format!("sha256:{}…", e.email_hash.get(..16).unwrap_or(&e.email_hash)));
                println!(
                    "{:<8} {:<40} {:<13} {:<20} {:<18} {:<17} {}",
                    e.id,
                    who,
                    e.reason,
                    e.campaign.as_deref().unwrap_or("(all)"),
                    e.source,
                    e.created_at.format("%Y-%m-%d %H:%M"),
                    e.note.as_deref().unwrap_or("")
                );
            }
            if let Some(next) = page.next_after {
                eprintln!("more: --after {next}");
            }
        }
        SuppressionAction::Add {
            email,
            reason,
            campaign,
            note,
        } => {
            let request = consent::NewSuppression {
                email: Some(email),
                reason: Some(reason),
                campaign,
                note,
            };
            let added = consent::add(&mut client, &request, "cli").await?;
            println!(
                "{} {} ({}); {} sequences ended, {} follow-ups cancelled",
                if added.new { "suppressed" } else { "already suppressed:" },
                added.entry.email.as_deref().unwrap_or(&added.entry.email_hash),
                added.entry.campaign.as_deref().unwrap_or("every campaign"),
                added.ended_enrollments,
                added.cancelled_deliveries
            );
        }
        SuppressionAction::Remove {
            email,
            reason,
            campaign,
        } => {
            consent::remove(&mut client, &email, campaign.as_deref(), Some(&reason), &cli_actor()).await?;
            println!(
                "{email} resubscribed ({})",
                campaign.as_deref().unwrap_or("every campaign")
            );
        }
        SuppressionAction::Import { file, campaign } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let report = consent::import(&mut client, &text, campaign.as_deref(), "import").await?;
            print!("{report}");
            if !report.rejected.is_empty() {
                anyhow::bail!(
                    "{} line(s) of {} rejected; the other addresses were suppressed",
                    report.rejected.len(),
                    file.display()
                );
            }
        }
    }
    Ok(())
}
