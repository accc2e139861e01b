//! `holdfast` command line: `run` the daemon, `check-config` a file, inspect and drop
//! durable `sessions`, `status` of the running gateway, `backup` the store (logic in
//! `holdfast::admin` and `holdfast::observe`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use holdfast::admin;
use holdfast::app::Gateway;
use holdfast::broker::client::Reserved;
use holdfast::config::Config;
use holdfast::observe::notify;
use holdfast::reload::Reloader;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Edge MQTT gateway: local broker, durable sessions, store-and-forward bridge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or SIGINT.
    Run {
        /// TOML configuration file (defaults are used for everything it omits; HOLDFAST_*
        /// environment variables override both).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and the files it refers to (password, ACL,
    /// certificates), and print the effective configuration (secrets redacted).
    CheckConfig {
        /// TOML configuration file.
        #[arg(required_unless_present = "config", conflicts_with = "config")]
        file: Option<PathBuf>,
        /// The same, given as `--config FILE` (as for `run`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Inspect or drop durable sessions (reads `<data_dir>/holdfast.db`).
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// Upstream bridges.
    Bridge {
        #[command(subcommand)]
        command: BridgeCommand,
    },
    /// Add or change a user in a password file (`[auth] password_file`): Argon2id hash,
    /// one `user:$argon2id$...` line per user. SIGHUP makes a running gateway re-read it.
    Passwd {
        /// Password file. A new file gets mode 0640 and the owner and group of its
        /// directory (`/etc/holdfast`, `root:holdfast`: readable by the service); an existing
        /// file keeps its owner, group and mode.
        file: PathBuf,
        /// User name.
        user: String,
        /// Read the password from the first line of standard input instead of the terminal.
        #[arg(long)]
        stdin: bool,
    },
    /// One screen about the running gateway: uptime, health, clients, sessions, messages,
    /// drops, store size, commit latency, bridges (asks it over the admin socket).
    Status {
        /// TOML configuration file (for `data_dir`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the JSON object instead.
        #[arg(long)]
        json: bool,
    },
    /// Publish one message (MQTT 3.1.1, a standard client: rumqttc) and wait for the
    /// broker's acknowledgement; for checking a gateway from its own shell.
    Pub {
        #[command(flatten)]
        target: MqttTarget,
        /// Topic.
        #[arg(long, short)]
        topic: String,
        /// Payload.
        #[arg(long, short)]
        message: String,
        /// QoS 0, 1 or 2.
        #[arg(long, short, default_value_t = 1)]
        qos: u8,
        /// Retain the message.
        #[arg(long, short)]
        retain: bool,
    },
    /// Subscribe and print `topic payload` lines (payloads as UTF-8, lossy).
    Sub {
        #[command(flatten)]
        target: MqttTarget,
        /// Topic filter.
        #[arg(long, short)]
        topic: String,
        /// QoS 0, 1 or 2.
        #[arg(long, short, default_value_t = 1)]
        qos: u8,
        /// Stop after this many messages (0 = never).
        #[arg(long, short = 'C', default_value_t = 0)]
        count: usize,
        /// Stop after this many seconds without a message (0 = never).
        #[arg(long, short = 'W', default_value_t = 0)]
        idle_secs: u64,
    },
    /// Consistent online backup of the store (works while the broker runs).
    ///
    /// Restore: stop the broker, copy FILE to `<data_dir>/holdfast.db`, remove
    /// `holdfast.db-wal` and `holdfast.db-shm`, start the broker.
    Backup {
        /// Where to write the copy (must not exist unless --force).
        file: PathBuf,
        /// TOML configuration file (for `data_dir`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Overwrite FILE if it exists.
        #[arg(long)]
        force: bool,
    },
}

/// Where `pub` / `sub` connect.
#[derive(clap::Args)]
struct MqttTarget {
    /// Broker host.
    #[arg(long, short = 'H', default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, short, default_value_t = 1883)]
    port: u16,
    /// Client id (default: holdfast-probe-<pid>).
    #[arg(long, short = 'i')]
    id: Option<String>,
    /// User name.
    #[arg(long, short)]
    user: Option<String>,
    /// Password (also from HOLDFAST_PROBE_PASSWORD, which keeps it out of `ps`).
    #[arg(
        long,
        short = 'P',
        env = "HOLDFAST_PROBE_PASSWORD",
        hide_env_values = true
    )]
    password: Option<String>,
}

impl MqttTarget {
    fn target(self) -> holdfast::probe::Target {
        holdfast::probe::Target {
            host: self.host,
            port: self.port,
            client_id: self
                .id
                .unwrap_or_else(|| format!("holdfast-probe-{}", std::process::id())),
            username: self.user,
            password: self.password,
        }
    }
}

#[derive(Subcommand)]
enum BridgeCommand {
    /// Per bridge: link state and since when, outbox backlog (messages, bytes, age of the
    /// oldest), messages sent/acknowledged/dropped, last error. Asks the running gateway;
    /// with none running, shows the backlog stored on disk.
    Status {
        /// TOML configuration file (for `data_dir`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// One line per durable session: protocol, state, expiry, queue, subscriptions.
    List {
        /// TOML configuration file (for `data_dir`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// One JSON object per session and line.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one session: subscriptions, queued messages, QoS 2 state, will.
    Show {
        client_id: String,
        /// TOML configuration file (for `data_dir`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// How many queued messages to show.
        #[arg(long, default_value_t = 10)]
        limit: u32,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Remove a session, its subscriptions and queued messages. On a running broker an
    /// online client is disconnected (v5: reason 0x98) and its will published; with the
    /// broker stopped the rows are deleted from the database (a pending will is discarded).
    Drop {
        client_id: String,
        /// TOML configuration file (for `data_dir`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { file, config } => match file.or(config) {
            Some(f) => check_config(f),
            None => Err(anyhow::anyhow!("check-config needs a configuration file")),
        },
        Command::Sessions { command } => sessions(command),
        Command::Bridge { command } => bridge(command),
        Command::Passwd { file, user, stdin } => passwd(file, user, stdin),
        Command::Status { config, json } => status(config, json),
        Command::Backup {
            file,
            config,
            force,
        } => backup(file, config, force),
        Command::Pub {
            target,
            topic,
            message,
            qos,
            retain,
        } => probe_runtime().and_then(|rt| {
            rt.block_on(holdfast::probe::publish(
                &target.target(),
                &topic,
                message.into_bytes(),
                qos,
                retain,
                std::time::Duration::from_secs(10),
            ))
        }),
        Command::Sub {
            target,
            topic,
            qos,
            count,
            idle_secs,
        } => probe_runtime().and_then(|rt| {
            let idle = (idle_secs > 0).then(|| std::time::Duration::from_secs(idle_secs));
            rt.block_on(holdfast::probe::subscribe(
                &target.target(),
                &topic,
                qos,
                count,
                idle,
                |t, p| println!("{t} {}", String::from_utf8_lossy(p)),
            ))
            .map(|_| ())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfast: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn probe_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn check_config(file: PathBuf) -> anyhow::Result<()> {
    let cfg = Config::load(Some(&file))?;
    cfg.check_files(Some(&file))?;
    print!("{}", cfg.to_toml_redacted());
    eprintln!("holdfast: {} is valid", file.display());
    Ok(())
}

fn bridge(command: BridgeCommand) -> anyhow::Result<()> {
    let BridgeCommand::Status { config, json } = command;
    let cfg = Config::load(config.as_deref())?;
    let dir = cfg.data_dir.clone();
    match holdfast::admin::bridge_status_at(&cfg.admin_socket_path())? {
        Some(items) => {
            if json {
                println!("{}", serde_json::to_string(&items)?);
            } else {
                print!(
                    "{}",
                    holdfast::cli::format_bridges(&items, holdfast::store::unix_ms())
                );
            }
        }
        None => {
            eprintln!(
                "holdfast: no gateway running on {}; backlog on disk:",
                dir.display()
            );
            let sessions = holdfast::admin::list_sessions(&dir)?;
            for (name, s) in sessions
                .iter()
                .filter_map(|s| Some((Reserved::Bridge.strip(&s.client_id)?, s)))
            {
                println!(
                    "{}  queued {}  bytes {}  in flight {}  dropped {}",
                    name, s.queued, s.queued_bytes, s.inflight, s.dropped
                );
            }
        }
    }
    Ok(())
}

fn status(config: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config.as_deref())?;
    let socket = cfg.admin_socket_path();
    let Some(v) = admin::gateway_status_at(&socket)? else {
        anyhow::bail!(
            "no gateway running on {} (no answer on {})",
            cfg.data_dir.display(),
            socket.display()
        );
    };
    if json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        print!(
            "{}",
            holdfast::cli::format_status(&v, holdfast::store::unix_ms())
        );
    }
    Ok(())
}

fn data_dir(config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(Config::load(config.as_deref())?.data_dir)
}

fn sessions(command: SessionsCommand) -> anyhow::Result<()> {
    let now = holdfast::store::unix_ms();
    match command {
        SessionsCommand::List { config, json } => {
            let sessions = admin::list_sessions(&data_dir(config)?)?;
            if json {
                for s in &sessions {
                    println!("{}", serde_json::to_string(s)?);
                }
            } else {
                print!("{}", holdfast::cli::format_list(&sessions, now));
            }
        }
        SessionsCommand::Show {
            client_id,
            config,
            limit,
            json,
        } => {
            let dir = data_dir(config)?;
            let Some(detail) = admin::show_session(&dir, &client_id, limit)? else {
                anyhow::bail!(
                    "no durable session with client id {client_id:?} in {}",
                    holdfast::store::db_path(&dir).display()
                );
            };
            if json {
                println!("{}", serde_json::to_string(&detail)?);
            } else {
                print!("{}", holdfast::cli::format_detail(&detail, now));
            }
        }
        SessionsCommand::Drop { client_id, config } => {
            let cfg = Config::load(config.as_deref())?;
            let dir = cfg.data_dir.clone();
            let shown = holdfast::cli::display_id(&client_id);
            match admin::drop_session_at(&dir, &cfg.admin_socket_path(), &client_id)? {
                admin::DropOutcome::DroppedByBroker => println!(
                    "dropped session {shown} on the running broker \
                     (client disconnected if online, will published if any)"
                ),
                admin::DropOutcome::DeletedOffline { queued, had_will } => println!(
                    "broker not running: deleted session {shown} from {} \
                     ({queued} queued message(s) discarded{})",
                    holdfast::store::db_path(&dir).display(),
                    if had_will {
                        ", pending will discarded"
                    } else {
                        ""
                    }
                ),
                admin::DropOutcome::NotFound { broker_running } => anyhow::bail!(
                    "no session with client id {client_id:?} {}",
                    if broker_running {
                        "on the running broker".to_string()
                    } else {
                        format!("in {}", holdfast::store::db_path(&dir).display())
                    }
                ),
            }
        }
    }
    Ok(())
}

fn backup(file: PathBuf, config: Option<PathBuf>, force: bool) -> anyhow::Result<()> {
    let r = admin::backup(&data_dir(config)?, &file, force)?;
    println!(
        "backup written to {}: {} bytes ({} pages in {} step(s)), {} session(s), {} queued message(s), \
         integrity ok, {:.2}s",
        r.path.display(),
        r.bytes,
        r.pages,
        r.steps,
        r.sessions,
        r.queued,
        r.duration.as_secs_f64()
    );
    Ok(())
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = Config::load(config.as_deref())?;
    let log = holdfast::observe::init_tracing(&cfg.log)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cfg.worker_threads > 0 {
        builder.worker_threads(cfg.worker_threads);
    }
    let rt = builder
        .enable_all()
        .thread_name("holdfast")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        info!(version = env!("CARGO_PKG_VERSION"), config = ?config, "holdfast starting");
        let broker = Gateway::start(&cfg).await?;
        let listening: Vec<String> = broker.local_addrs().iter().map(|a| a.to_string()).collect();
        notify::ready(&format!("listening on {}", listening.join(", ")));
        let watchdog = CancellationToken::new();
        if let Some(timeout) = notify::watchdog_timeout() {
            info!(
                timeout_ms = timeout.as_millis() as u64,
                "systemd watchdog enabled: pinging every half timeout while the router and the store writer answer"
            );
            tokio::spawn(notify::watchdog(broker.observer(), timeout, watchdog.clone()));
        }
        let mut reloader = Reloader::new(config.clone(), cfg.clone(), log);
        wait_for_signal(&broker, &mut reloader).await?;
        watchdog.cancel();
        notify::stopping();
        broker.shutdown().await;
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

/// Waits for SIGTERM or SIGINT; SIGHUP reloads the password, ACL and certificate files and
/// the reloadable settings of the configuration file (`holdfast::reload`).
async fn wait_for_signal(broker: &Gateway, reloader: &mut Reloader) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM received"); break }
            _ = int.recv() => { info!("SIGINT received"); break }
            _ = hup.recv() => {
                info!("SIGHUP received: reloading password, ACL and certificate files and the configuration");
                reloader.reload(broker);
            }
        }
    }
    Ok(())
}

/// `holdfast passwd FILE USER`: adds or replaces USER's Argon2id hash in FILE. The password
/// comes from the terminal (twice, not echoed) or, with `--stdin`, from the first line of
/// standard input.
///
/// Ownership, so that the service user can read what root wrote: an existing file keeps its
/// owner, group and mode; a new one gets mode 0640 and its directory's owner and group
/// (`/etc/holdfast` is `root:holdfast`). The result is checked: a file the directory's group
/// cannot read is reported.
fn passwd(file: PathBuf, user: String, stdin: bool) -> anyhow::Result<()> {
    use std::io::BufRead;
    holdfast::auth::password::valid_user_name(&user).map_err(anyhow::Error::msg)?;
    let password = if stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else {
        let first = rpassword::prompt_password(format!("Password for {user}: "))
            .context("reading the password from the terminal (use --stdin to pipe it)")?;
        let again = rpassword::prompt_password("Again: ").context("reading the password")?;
        if first != again {
            anyhow::bail!("the passwords do not match");
        }
        first
    };
    if password.is_empty() {
        anyhow::bail!("empty password refused");
    }
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    // Refuse to rewrite a file that would not load (keeps the operator's mistakes visible).
    holdfast::auth::PasswordFile::parse(&file, &text)?;
    let hash = holdfast::auth::password::hash_password(&password).map_err(anyhow::Error::msg)?;
    let new = holdfast::auth::password::set_user(&text, &user, &hash);
    // Write a sibling file and rename it over, so a crash never leaves half a file.
    let tmp = file.with_extension("tmp-passwd");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(new.as_bytes())?;
        f.sync_all()?;
    }
    if let Err(e) = passwd_ownership(&file, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &file).with_context(|| format!("replacing {}", file.display()))?;
    eprintln!("holdfast: password for {user} set in {}", file.display());
    Ok(())
}

/// Gives `tmp` (the new password file) the ownership and mode `file` should have: those of
/// the existing `file`, or for a new file mode 0640 with the owner and group of its
/// directory. Changing the owner needs root; other users keep their own and get the mode.
fn passwd_ownership(file: &std::path::Path, tmp: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (uid, gid, mode) = match std::fs::metadata(file) {
        Ok(meta) => (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        Err(_) => {
            let dir = match file.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            let meta = std::fs::metadata(dir)
                .with_context(|| format!("reading the owner of {}", dir.display()))?;
            (meta.uid(), meta.gid(), 0o640)
        }
    };
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    let me = std::fs::metadata(tmp)?;
    if (me.uid(), me.gid()) != (uid, gid) {
        if let Err(e) = std::os::unix::fs::chown(tmp, Some(uid), Some(gid)) {
            eprintln!(
                "holdfast: warning: cannot give {} owner {uid} and group {gid} ({e}); \
                 make sure the holdfast service user can read it",
                file.display()
            );
        }
    }
    Ok(())
}
