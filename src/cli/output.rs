//! Printing results: text for people, JSON for scripts, one function per result.

use std::path::Path;

use serde::Serialize;

use crate::appliance::data_dir::DataDir;
use crate::model::{GridId, ServerId, Template, TemplateKind, TemplateName, UserName};
use crate::service::host_check::{CheckStatus, HostCheckReport};
use crate::service::templates::StoredTemplate;
use crate::service::{StateSummary, StatusReport};
use crate::state::RecoveryReport;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug)]
pub struct Output {
    format: OutputFormat,
}

impl Output {
    pub fn new(format: OutputFormat) -> Self {
        Self { format }
    }

    fn json<T: Serialize>(&self, value: &T) {
        match serde_json::to_string_pretty(value) {
            Ok(text) => println!("{text}"),
            Err(error) => eprintln!("error: cannot encode the result as JSON: {error}"),
        }
    }

    pub fn error(&self, error: &anyhow::Error) {
        let message = crate::error_chain(error.as_ref());
        match self.format {
            OutputFormat::Text => eprintln!("error: {message}"),
            OutputFormat::Json => {
                self.json(&serde_json::json!({ "error": message }));
            }
        }
    }

    pub fn initialised(
        &self,
        data_dir: &DataDir,
        server_id: ServerId,
        grid_id: Option<GridId>,
        admin: Option<&UserName>,
    ) {
        match self.format {
            OutputFormat::Text => {
                println!(
                    "initialised {} (server id {server_id})",
                    data_dir.root().display()
                );
                if let (Some(grid_id), Some(admin)) = (grid_id, admin) {
                    println!("created grid {grid_id} with admin {admin:?}");
                    println!("add servers: `deskgrid token create` here, then `deskgrid join THIS_ADDRESS --token TOKEN` there");
                }
                println!(
                    "settings: {} (commented; edit, then restart)",
                    data_dir.config_file().display()
                );
                println!(
                    "next: deskgrid serve --data-dir {}",
                    data_dir.root().display()
                );
            }
            OutputFormat::Json => self.json(&serde_json::json!({
                "data_dir": data_dir.root(),
                "server_id": server_id,
                "grid_id": grid_id,
                "config_file": data_dir.config_file(),
            })),
        }
    }

    pub fn joined(&self, data_dir: &DataDir, server_id: ServerId, grid_id: GridId, seed: &str) {
        match self.format {
            OutputFormat::Text => {
                println!("joined grid {grid_id} through {seed} as server {server_id}");
                println!(
                    "next: deskgrid serve --data-dir {}",
                    data_dir.root().display()
                );
            }
            OutputFormat::Json => self.json(&serde_json::json!({
                "data_dir": data_dir.root(),
                "server_id": server_id,
                "grid_id": grid_id,
                "seed": seed,
            })),
        }
    }

    pub fn discovered(&self, grids: &[crate::service::grid::DiscoveredGrid]) {
        match self.format {
            OutputFormat::Text => {
                if grids.is_empty() {
                    println!("no grid announced itself (servers announce only with `mdns` set in their config.toml)");
                }
                for grid in grids {
                    println!("grid {}", grid.grid_id);
                    for server in &grid.servers {
                        let addresses: Vec<String> =
                            server.addresses.iter().map(ToString::to_string).collect();
                        println!("  server {}  {}", server.server_id, addresses.join(", "));
                    }
                }
            }
            OutputFormat::Json => self.json(&grids),
        }
    }

    pub fn server_removed(&self, id: ServerId) {
        match self.format {
            OutputFormat::Text => {
                println!("server {id} removed from the grid; its certificate is revoked")
            }
            OutputFormat::Json => self.json(&serde_json::json!({ "removed": id })),
        }
    }

    pub fn join_token(&self, token: &str, expires_at_ms: u64, uses: u32) {
        match self.format {
            OutputFormat::Text => {
                println!("{token}");
                eprintln!(
                    "valid for {uses} join(s) until {} (unix ms); on the new server: deskgrid join THIS_SERVER:PORT --token TOKEN",
                    expires_at_ms
                );
            }
            OutputFormat::Json => self.json(&serde_json::json!({
                "token": token,
                "expires_at_ms": expires_at_ms,
                "uses": uses,
            })),
        }
    }

    pub fn status(&self, status: &StatusReport) {
        match self.format {
            OutputFormat::Text => {
                println!("server   {} ({})", status.name, status.server_id);
                println!("site     {}", status.site);
                println!("version  {}", status.software_version);
                println!("uptime   {}s", status.uptime_ms / 1000);
                match status.grid_id {
                    Some(grid_id) => println!("grid     {grid_id}"),
                    None => println!("grid     none (standalone)"),
                }
                let capacity = &status.capacity;
                if capacity.cpus == 0 {
                    println!("host     not reached yet (see the server's log)");
                } else {
                    println!(
                        "host     {} CPUs, {} of {} MiB memory free, {} of {} GiB storage free",
                        capacity.cpus,
                        capacity.memory_free_mib,
                        capacity.memory_total_mib,
                        capacity.storage_free_bytes >> 30,
                        capacity.storage_total_bytes >> 30
                    );
                }
                match &status.api {
                    crate::service::ApiStatus::Off => println!("api      off"),
                    crate::service::ApiStatus::Listening {
                        address,
                        certificate_sha256,
                    } => println!(
                        "api      https://{address}/api/v1/ (certificate SHA-256 {certificate_sha256})"
                    ),
                    crate::service::ApiStatus::Failed { address, reason } => {
                        println!("api      not listening on {address}: {reason}");
                    }
                }
                print_summary(&status.state);
                println!(
                    "{:<36}  {:<16} {:<10} {:<22} {:<8} {:>9} {:>7} last update",
                    "server", "name", "site", "address", "state", "VMs/ready", "images"
                );
                for server in &status.servers {
                    println!(
                        "{:<36}  {:<16} {:<10} {:<22} {:<8} {:>9} {:>7} {}{}",
                        server.id,
                        server.name,
                        server.site,
                        server.addresses.first().map_or("-", String::as_str),
                        server.state,
                        format!("{}/{}", server.vms, server.ready_vms),
                        if server.images_pulling > 0 {
                            format!("{}+{}", server.images_complete, server.images_pulling)
                        } else {
                            server.images_complete.to_string()
                        },
                        server.updated_at_ms,
                        if server.this_server {
                            "  (this server)"
                        } else {
                            ""
                        }
                    );
                }
                for server in &status.servers {
                    for (image, transfer) in &server.transfers {
                        println!(
                            "pulling {image}{} on {}: {}% of {} MiB at {} MB/s from {}",
                            if transfer.difference_disk {
                                " (difference disk)"
                            } else {
                                ""
                            },
                            server.name,
                            (transfer.bytes_done * 100)
                                .checked_div(transfer.bytes_total)
                                .unwrap_or(100),
                            transfer.bytes_total >> 20,
                            transfer.rate_bytes_per_s / 1_000_000,
                            transfer.sources.join(", ")
                        );
                    }
                    for job in &server.jobs {
                        println!(
                            "job on {}: {} [{:?}, {} attempt(s)]{}",
                            server.name,
                            job.summary,
                            job.state,
                            job.attempts,
                            job.last_error
                                .as_ref()
                                .map(|error| format!(": {error}"))
                                .unwrap_or_default()
                        );
                    }
                }
            }
            OutputFormat::Json => self.json(status),
        }
    }

    pub fn plan(&self, plan: &crate::service::plan::PlanReport) {
        match self.format {
            OutputFormat::Text => {
                println!(
                    "plan of server {} from state {}",
                    plan.server_id,
                    &plan.state_digest[..16]
                );
                if !plan.missing.is_empty() {
                    println!("missing (given nothing): {} server(s)", plan.missing.len());
                }
                if plan.steps.is_empty() {
                    println!("nothing to do: images and desktops are where they should be");
                }
                for step in &plan.steps {
                    println!(
                        "{} {:<16} {}\n    because {}",
                        if step.this_server { "*" } else { " " },
                        step.target_name,
                        step.summary,
                        step.reason
                    );
                }
                if plan.steps.iter().any(|step| step.this_server) {
                    println!("(* = this server carries the step out)");
                }
                for shortfall in &plan.shortfalls {
                    println!(
                        "short: template {} lacks {} VM(s): {}",
                        shortfall.template, shortfall.missing_vms, shortfall.cause
                    );
                }
                for job in &plan.jobs {
                    println!(
                        "job: {} [{:?}, {} attempt(s)]{}",
                        job.summary,
                        job.state,
                        job.attempts,
                        job.last_error
                            .as_ref()
                            .map(|error| format!(": {error}"))
                            .unwrap_or_default()
                    );
                }
            }
            OutputFormat::Json => self.json(plan),
        }
    }

    pub fn host_check(&self, report: &HostCheckReport) {
        match self.format {
            OutputFormat::Text => {
                println!("host check of {}", report.libvirt_uri);
                for item in &report.checks {
                    let mark = match item.status {
                        CheckStatus::Ok => "ok      ",
                        CheckStatus::Warning => "WARNING ",
                        CheckStatus::Blocking => "BLOCKING",
                    };
                    println!("  {mark} {:<14} {}", item.check, item.found);
                    if let Some(fix) = &item.fix {
                        println!("  {:<8} {:<14} fix: {fix}", "", "");
                    }
                }
                if report.ready() {
                    println!("ready: this host can run desktops");
                } else {
                    println!("not ready: fix the BLOCKING items above");
                }
            }
            OutputFormat::Json => self.json(&serde_json::json!({
                "ready": report.ready(),
                "libvirt_uri": report.libvirt_uri,
                "checks": report.checks,
            })),
        }
    }

    pub fn compacted(&self, summary: &StateSummary) {
        match self.format {
            OutputFormat::Text => {
                println!(
                    "state compacted into snapshot generation {}",
                    summary.generation
                );
                print_summary(summary);
            }
            OutputFormat::Json => self.json(summary),
        }
    }

    pub fn state_check(&self, state_dir: &Path, report: &RecoveryReport, server_running: bool) {
        match self.format {
            OutputFormat::Text => {
                println!("state in {}: recoverable", state_dir.display());
                match report.snapshot_bytes {
                    Some(bytes) => println!(
                        "  snapshot   generation {}, {bytes} bytes",
                        report.generation
                    ),
                    None => println!("  snapshot   none yet (generation 0)"),
                }
                println!(
                    "  log        {} records, {} bytes",
                    report.log_records, report.log_bytes
                );
                println!("  entries    {}", report.entries);
                println!("  digest     {}", report.digest);
                if let Some(torn) = &report.torn_tail {
                    println!(
                        "  torn tail  {} bytes at byte offset {} of {} ({}); the next start cuts them off",
                        torn.discarded_bytes,
                        torn.offset,
                        torn.path.display(),
                        torn.reason
                    );
                }
                for stale in &report.stale_files {
                    println!("  leftover   {} (from an interrupted compaction; removed at the next start)", stale.display());
                }
                if server_running {
                    println!("note: a server is running on this data directory; its latest writes may be in flight");
                }
            }
            OutputFormat::Json => self.json(&serde_json::json!({
                "state_dir": state_dir,
                "recoverable": true,
                "server_running": server_running,
                "report": report,
            })),
        }
    }
}

fn print_summary(summary: &StateSummary) {
    println!("servers  {}", summary.servers);
    println!("templates {}", summary.templates);
    println!(
        "state    {} entries, digest {}",
        summary.entries,
        &summary.digest[..16.min(summary.digest.len())]
    );
    println!(
        "storage  snapshot generation {}, log {} records ({} bytes)",
        summary.generation, summary.log_records, summary.log_bytes
    );
}

/// Templates.
impl Output {
    /// A template just created or changed (`done`); warnings go to stderr
    /// whatever the format, so JSON on stdout stays clean.
    pub fn template_stored(&self, stored: &StoredTemplate, done: &str) {
        let template = &stored.template;
        match self.format {
            OutputFormat::Text => println!(
                "template {} {done}: image {}, {} vCPUs, {} MiB, {} desired, {} min idle, {} replicas, {}, {}, {} monitor(s)",
                template.name,
                template.image,
                template.vcpus,
                template.memory_mib,
                template.desired_vms,
                template.min_idle_vms,
                template.min_replicas,
                kind_label(template.kind),
                display_label(template.display),
                template.monitors,
            ),
            OutputFormat::Json => self.json(template),
        }
        for warning in &stored.warnings {
            eprintln!("warning: {warning}");
        }
    }

    pub fn template_deleted(&self, name: &TemplateName) {
        match self.format {
            OutputFormat::Text => println!("template {name} deleted"),
            OutputFormat::Json => self.json(&serde_json::json!({ "deleted": name })),
        }
    }

    /// Templates as a table (sorted by name, as the server sends them).
    pub fn policy(&self, policy: &crate::model::Policy) {
        match self.format {
            OutputFormat::Text => {
                let ratio = |permille: u32| format!("{}.{:03}:1", permille / 1000, permille % 1000);
                let rows = [
                    (
                        "disconnect grace",
                        format!("{} s", policy.disconnect_grace_s),
                    ),
                    (
                        "max concurrent boots",
                        policy.max_concurrent_boots.to_string(),
                    ),
                    ("cpu overcommit", ratio(policy.cpu_overcommit_permille)),
                    (
                        "memory overcommit",
                        ratio(policy.memory_overcommit_permille),
                    ),
                    (
                        "host reserved memory",
                        format!("{} MiB", policy.host_reserved_memory_mib),
                    ),
                    ("replica hysteresis", policy.replica_hysteresis.to_string()),
                    (
                        "desired change threshold",
                        policy.desired_change_threshold.to_string(),
                    ),
                ];
                for (label, value) in rows {
                    println!("{label:<26}{value}");
                }
            }
            OutputFormat::Json => self.json(policy),
        }
    }

    pub fn templates(&self, templates: &[Template]) {
        match self.format {
            OutputFormat::Text => {
                if templates.is_empty() {
                    println!("no templates yet: create one with `deskgrid template create NAME --image VERSION --vcpus N --memory MIB --desired N`");
                    return;
                }
                let name_width = column_width("name", templates.iter().map(|t| t.name.to_string()));
                let image_width =
                    column_width("image", templates.iter().map(|t| t.image.to_string()));
                println!(
                    "{:<name_width$}  {:<image_width$}  {:>5}  {:>10}  {:>7}  {:>8}  {:>8}  kind",
                    "name", "image", "vcpus", "memory", "desired", "min idle", "replicas"
                );
                for template in templates {
                    println!(
                        "{:<name_width$}  {:<image_width$}  {:>5}  {:>10}  {:>7}  {:>8}  {:>8}  {}",
                        template.name.to_string(),
                        template.image.to_string(),
                        template.vcpus,
                        format!("{} MiB", template.memory_mib),
                        template.desired_vms,
                        template.min_idle_vms,
                        template.min_replicas,
                        kind_label(template.kind),
                    );
                }
            }
            OutputFormat::Json => self.json(&templates),
        }
    }
}

fn kind_label(kind: TemplateKind) -> &'static str {
    match kind {
        TemplateKind::Pooled => "pooled",
        TemplateKind::Personal => "personal",
    }
}

fn display_label(display: crate::model::DisplayProtocol) -> &'static str {
    match display {
        crate::model::DisplayProtocol::Spice => "spice",
        crate::model::DisplayProtocol::Vnc => "vnc",
    }
}

/// The width of a text column: its widest cell or its header.
fn column_width(header: &str, cells: impl Iterator<Item = String>) -> usize {
    cells
        .map(|cell| cell.chars().count())
        .fold(header.len(), usize::max)
}

/// Users, entitlements, sessions and desktops.
impl Output {
    pub fn user_added(&self, user: &crate::service::users::UserSummary) {
        match self.format {
            OutputFormat::Text => {
                println!("user {} created", user.name);
                if !user.groups.is_empty() {
                    println!("groups: {}", joined(&user.groups));
                }
                if user.templates.is_empty() {
                    println!(
                        "next: deskgrid entitle --user {} --template TEMPLATE",
                        user.name
                    );
                }
            }
            OutputFormat::Json => self.json(user),
        }
    }

    pub fn users(&self, users: &[crate::service::users::UserSummary]) {
        match self.format {
            OutputFormat::Text => {
                if users.is_empty() {
                    println!("no users yet: add one with `deskgrid user add NAME`");
                    return;
                }
                let name_width =
                    column_width("name", users.iter().map(|user| user.name.to_string()));
                println!(
                    "{:<name_width$}  {:<5}  {:<20}  templates",
                    "name", "role", "groups"
                );
                for user in users {
                    let role = match user.role {
                        crate::model::Role::Admin => "admin",
                        crate::model::Role::User => "user",
                    };
                    println!(
                        "{:<name_width$}  {:<5}  {:<20}  {}",
                        user.name.to_string(),
                        role,
                        joined(&user.groups),
                        joined(&user.templates),
                    );
                }
            }
            OutputFormat::Json => self.json(&users),
        }
    }

    pub fn user_deleted(&self, name: &UserName) {
        match self.format {
            OutputFormat::Text => println!("user {name} deleted"),
            OutputFormat::Json => self.json(&serde_json::json!({ "deleted": name })),
        }
    }

    pub fn entitlement(&self, change: &crate::service::users::EntitlementChange) {
        let subject = match &change.entitlement.subject {
            crate::model::EntitlementSubject::User(user) => format!("user {user}"),
            crate::model::EntitlementSubject::Group(group) => format!("group {group}"),
        };
        let template = &change.entitlement.template;
        match self.format {
            OutputFormat::Text => match (change.removed, change.changed) {
                (true, _) => println!("{subject} may no longer use template {template}"),
                (false, true) => println!("{subject} may use template {template}"),
                (false, false) => println!("{subject} may already use template {template}"),
            },
            OutputFormat::Json => self.json(change),
        }
    }

    pub fn sessions(&self, sessions: &[crate::service::users::SessionSummary]) {
        match self.format {
            OutputFormat::Text => {
                if sessions.is_empty() {
                    println!("no sessions");
                    return;
                }
                let user_width =
                    column_width("user", sessions.iter().map(|row| row.user.to_string()));
                let server_width =
                    column_width("server", sessions.iter().map(|row| row.server_name.clone()));
                println!(
                    "{:<user_width$}  {:<12}  {:<server_width$}  {:<36}  since",
                    "user", "state", "server", "vm"
                );
                for row in sessions {
                    let ago = |ms: u64| crate::service::now_ms().saturating_sub(ms) / 1000;
                    let mut since = row
                        .since_ms
                        .map_or_else(|| "-".to_owned(), |ms| format!("{} s ago", ago(ms)));
                    if let Some(gone) = row.viewer_gone_at_ms {
                        since.push_str(&format!(" (viewer gone {} s ago)", ago(gone)));
                    }
                    println!(
                        "{:<user_width$}  {:<12}  {:<server_width$}  {:<36}  {since}",
                        row.user.to_string(),
                        row.state,
                        row.server_name,
                        row.vm.to_string(),
                    );
                }
            }
            OutputFormat::Json => self.json(&sessions),
        }
    }

    pub fn logged_off(&self, report: &crate::service::desktops::LogoffReport) {
        match self.format {
            OutputFormat::Text => println!(
                "user {}: {} session(s) ended on {}",
                report.user,
                report.ended,
                report.servers.join(", ")
            ),
            OutputFormat::Json => self.json(report),
        }
    }

    /// A reserved desktop: the ticket goes into the .vv file (and the JSON
    /// a script asked for), never onto a terminal.
    pub fn connected(&self, reservation: &crate::service::desktops::Reservation, vv_file: &Path) {
        match self.format {
            OutputFormat::Text => {
                let protocol = display_label(reservation.protocol);
                let again = if reservation.returning {
                    " (your existing desktop)"
                } else {
                    ""
                };
                println!(
                    "desktop {} of template {} on {}{again}",
                    reservation.vm, reservation.template, reservation.server
                );
                println!(
                    "display: {protocol}://{}:{}",
                    reservation.host, reservation.port
                );
                println!(
                    "ticket valid for {} s; open it with: remote-viewer {}",
                    reservation
                        .expires_at_ms
                        .saturating_sub(crate::service::now_ms())
                        / 1000,
                    vv_file.display()
                );
            }
            OutputFormat::Json => self.json(&serde_json::json!({
                "reservation": reservation,
                "vv_file": vv_file,
            })),
        }
    }
}

fn joined<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Base images (`deskgrid image`).
impl Output {
    /// Whether results are printed for people (progress bars make sense).
    pub fn is_text(&self) -> bool {
        self.format == OutputFormat::Text
    }

    pub fn image_imported(&self, report: &crate::service::images::ImportReport) {
        match self.format {
            OutputFormat::Text => println!(
                "imported {}: {} from {}, {}, {:.0} MB/s ({:.1} s)",
                report.version,
                indicatif::BinaryBytes(report.virtual_size),
                report.source_format,
                report.digest,
                report.mb_per_second,
                report.seconds,
            ),
            OutputFormat::Json => self.json(report),
        }
    }

    pub fn diff_published(&self, report: &crate::service::images::diffs::PublishReport) {
        match self.format {
            OutputFormat::Text => println!(
                "published {} (parent {}): {}, {}; overlay {} raw, {} zstd-compressed ({:.1} s)",
                report.import.version,
                report.parent,
                indicatif::BinaryBytes(report.import.virtual_size),
                report.import.digest,
                indicatif::BinaryBytes(report.overlay_bytes),
                indicatif::BinaryBytes(report.compressed_bytes),
                report.import.seconds,
            ),
            OutputFormat::Json => self.json(report),
        }
    }

    /// Image versions as a table (sorted by version, as the server sends them).
    pub fn images(&self, images: &[crate::service::images::ImageSummary]) {
        /// Hex digits of a digest shown in the table (`--output json` has all).
        const DIGEST_HEX_SHOWN: usize = 12;
        match self.format {
            OutputFormat::Text => {
                if images.is_empty() {
                    println!("no base images yet: import one with `deskgrid image import FILE --name VERSION`");
                    return;
                }
                let rows: Vec<[String; 7]> = images
                    .iter()
                    .map(|image| {
                        let digest = image.digest.map_or_else(
                            || "-".to_owned(),
                            |digest| {
                                let text = digest.to_string();
                                let shown = "sha256:".len() + DIGEST_HEX_SHOWN;
                                text.get(..shown).unwrap_or(&text).to_owned()
                            },
                        );
                        let server = |name: &str, this_server: bool| {
                            if this_server {
                                format!("{name} (this)")
                            } else {
                                name.to_owned()
                            }
                        };
                        let complete: Vec<String> = image
                            .complete_on
                            .iter()
                            .map(|holder| server(&holder.name, holder.this_server))
                            .collect();
                        let pulling: Vec<String> = image
                            .pulling_on
                            .iter()
                            .map(|pull| {
                                let percent = pull
                                    .bytes_done
                                    .saturating_mul(100)
                                    .checked_div(pull.bytes_total)
                                    .unwrap_or(0);
                                format!("{} {percent}%", server(&pull.name, pull.this_server))
                            })
                            .collect();
                        let list = |items: Vec<String>| {
                            if items.is_empty() {
                                "-".to_owned()
                            } else {
                                items.join(", ")
                            }
                        };
                        [
                            image.id.to_string(),
                            image_state_label(image.state).to_owned(),
                            indicatif::BinaryBytes(image.virtual_size).to_string(),
                            digest,
                            image
                                .parent
                                .as_ref()
                                .map_or_else(|| "-".to_owned(), ToString::to_string),
                            list(complete),
                            list(pulling),
                        ]
                    })
                    .collect();
                let headers = [
                    "version",
                    "state",
                    "size",
                    "digest",
                    "parent",
                    "complete on",
                    "pulling",
                ];
                let widths: Vec<usize> = headers
                    .iter()
                    .enumerate()
                    .map(|(column, header)| {
                        column_width(header, rows.iter().map(|row| row[column].clone()))
                    })
                    .collect();
                let print_row = |cells: &[String]| {
                    let line: Vec<String> = cells
                        .iter()
                        .zip(&widths)
                        .map(|(cell, width)| format!("{cell:<width$}"))
                        .collect();
                    println!("{}", line.join("  ").trim_end());
                };
                print_row(&headers.map(str::to_owned));
                for row in &rows {
                    print_row(row);
                }
            }
            OutputFormat::Json => self.json(&images),
        }
    }
}

fn image_state_label(state: crate::model::ImageState) -> &'static str {
    match state {
        crate::model::ImageState::Importing => "importing",
        crate::model::ImageState::Ready => "ready",
        crate::model::ImageState::Retired => "retired",
    }
}
