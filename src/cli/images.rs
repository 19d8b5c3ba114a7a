//! `deskgrid image`: import a disk image file as a base image version of the
//! grid, and list the grid's versions.
//!
//! The import runs in this process, on the server's host (it reads the file
//! and writes the pool and the data directory, as the server would); the
//! running server is asked, through the control socket, whether the version
//! is new and then to register it.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::output::Output;
use crate::api::control_socket::{self, ControlCommand, ControlReply};
use crate::appliance::config::Config;
use crate::appliance::data_dir::DataDir;
use crate::model::{ImageDigest, ImageVersionId};
use crate::service::images::{
    ImageRegistry, ImageSummary, ImportPhase, ImportProgress, RegistryError,
};

/// How often the progress bar redraws at most: smooth enough for a person,
/// cheap next to gigabytes of hashing.
const BAR_REFRESH_HZ: u8 = 10;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a disk image file as a new base image version: raw, qcow2, or
    /// anything else qemu-img reads (vmdk, vdi, vhdx, ...), converted to raw
    /// first. The image goes into this host's storage pool, its manifest
    /// (chunk digests) is computed on the way, and the running server
    /// registers the version in the grid, after which the grid replicates it.
    /// Run it on the server's host, with the server running. Ctrl-C stops it
    /// and removes what it made.
    Import(ImportArgs),

    /// Publish a qcow2 overlay as a new version derived from PARENT: the
    /// overlay holds the guest's writes of a maintenance VM booted on an
    /// overlay of PARENT. This server must hold PARENT complete. The
    /// overlay is flattened onto PARENT into the new version's raw volume
    /// (its manifest computed on the way) and kept zstd-compressed, so
    /// servers holding PARENT fetch only the overlay and rebuild the
    /// version. Run it on the server's host, with the server running.
    PublishDiff(PublishDiffArgs),

    /// List the grid's base image versions: state, virtual size, digest,
    /// parent, and the servers that hold each complete or are pulling it.
    List,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The disk image file (or block device).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// The new version's name (`win11-2026.11`): letters, digits, '-', '_'
    /// and '.'. Versions never change: an update is a new version.
    #[arg(long, value_name = "VERSION")]
    pub name: ImageVersionId,
}

#[derive(Debug, Args)]
pub struct PublishDiffArgs {
    /// The qcow2 overlay whose backing image is PARENT.
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,

    /// The version the overlay was made on.
    #[arg(long, value_name = "VERSION")]
    pub parent: ImageVersionId,

    /// The new version's name.
    #[arg(long, value_name = "VERSION")]
    pub name: ImageVersionId,
}

/// Runs a `deskgrid image` command.
pub fn run(data_dir: &DataDir, command: ImageCommand, output: &Output) -> anyhow::Result<ExitCode> {
    data_dir.require_initialised()?;
    match command {
        ImageCommand::Import(args) => import(data_dir, &args, output),
        ImageCommand::PublishDiff(args) => publish_diff(data_dir, &args, output),
        ImageCommand::List => {
            let images = ServerImages { data_dir }
                .images()
                .map_err(anyhow::Error::from_boxed)?;
            output.images(&images);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn import(data_dir: &DataDir, args: &ImportArgs, output: &Output) -> anyhow::Result<ExitCode> {
    let config = Config::load(&data_dir.config_file())?;
    let cancel = Arc::new(AtomicBool::new(false));
    cancel_on_stop_signals(Arc::clone(&cancel))?;
    let mut bar = ImportBar::new(output.is_text() && std::io::stderr().is_terminal());
    let imported = crate::service::images::import_image(
        data_dir,
        &config,
        &args.file,
        &args.name,
        &ServerImages { data_dir },
        &mut |progress| bar.show(progress),
        &cancel,
    );
    bar.finish();
    let report = imported.with_context(|| format!("cannot import {}", args.file.display()))?;
    output.image_imported(&report);
    Ok(ExitCode::SUCCESS)
}

fn publish_diff(
    data_dir: &DataDir,
    args: &PublishDiffArgs,
    output: &Output,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(&data_dir.config_file())?;
    let cancel = Arc::new(AtomicBool::new(false));
    cancel_on_stop_signals(Arc::clone(&cancel))?;
    let mut bar = ImportBar::new(output.is_text() && std::io::stderr().is_terminal());
    let published = crate::service::images::diffs::publish_diff(
        data_dir,
        &config,
        &args.overlay,
        &args.parent,
        &args.name,
        &ServerImages { data_dir },
        &mut |progress| bar.show(progress),
        &cancel,
    );
    bar.finish();
    let report = published.with_context(|| format!("cannot publish {}", args.overlay.display()))?;
    output.diff_published(&report);
    Ok(ExitCode::SUCCESS)
}

/// The running server, through the control socket.
#[derive(Debug)]
struct ServerImages<'a> {
    data_dir: &'a DataDir,
}

impl ServerImages<'_> {
    fn call(&self, command: ControlCommand) -> Result<ControlReply, RegistryError> {
        Ok(control_socket::call(
            &self.data_dir.control_socket(),
            self.data_dir.root(),
            command,
        )?)
    }
}

impl ImageRegistry for ServerImages<'_> {
    fn images(&self) -> Result<Vec<ImageSummary>, RegistryError> {
        match self.call(ControlCommand::ListImages)? {
            ControlReply::Images(images) => Ok(images),
            other => Err(format!("unexpected answer from the server: {other:?}").into()),
        }
    }

    fn register(
        &self,
        version: &ImageVersionId,
        digest: &ImageDigest,
        virtual_size: u64,
        parent: Option<&ImageVersionId>,
    ) -> Result<ImageSummary, RegistryError> {
        match self.call(ControlCommand::RegisterImage {
            version: version.clone(),
            digest: *digest,
            virtual_size,
            parent: parent.cloned(),
        })? {
            ControlReply::ImageRegistered(summary) => Ok(summary),
            other => Err(format!("unexpected answer from the server: {other:?}").into()),
        }
    }
}

/// SIGINT and SIGTERM set `cancel`: the import stops at its next read and
/// removes what it made. A second signal exits at once.
fn cancel_on_stop_signals(cancel: Arc<AtomicBool>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal watcher")?;
    // Installed here, before the import starts, so no signal is missed.
    let (mut interrupt, mut terminate) = {
        let _context = runtime.enter();
        (
            signal(SignalKind::interrupt()).context("cannot catch SIGINT")?,
            signal(SignalKind::terminate()).context("cannot catch SIGTERM")?,
        )
    };
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let mut signals = 0;
            loop {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
                signals += 1;
                if signals > 1 {
                    eprintln!("interrupted again: exiting without cleaning up");
                    std::process::exit(130);
                }
                eprintln!("interrupted: stopping the import and removing what it made");
                cancel.store(true, Ordering::SeqCst);
            }
        });
    });
    Ok(())
}

/// The import's progress on stderr, one bar per phase (converting,
/// importing); registering takes a moment and gets none.
#[derive(Debug)]
struct ImportBar {
    visible: bool,
    bar: Option<(ImportPhase, ProgressBar)>,
}

impl ImportBar {
    fn new(visible: bool) -> Self {
        Self { visible, bar: None }
    }

    fn show(&mut self, progress: ImportProgress) {
        if !self.visible {
            return;
        }
        if self
            .bar
            .as_ref()
            .is_none_or(|(phase, _)| *phase != progress.phase)
        {
            // A new phase starts its own rate and time-left estimate.
            self.finish();
            let label = match progress.phase {
                ImportPhase::Converting => "converting",
                ImportPhase::Importing => "importing",
                ImportPhase::Registering => return,
            };
            let style = ProgressStyle::with_template(
                "{msg:>10} [{wide_bar}] {bytes} / {total_bytes}  {bytes_per_sec}  {eta} left",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let bar = ProgressBar::with_draw_target(
                Some(progress.total),
                ProgressDrawTarget::stderr_with_hz(BAR_REFRESH_HZ),
            )
            .with_style(style)
            .with_message(label);
            self.bar = Some((progress.phase, bar));
        }
        if let Some((_, bar)) = &self.bar {
            bar.set_position(progress.done);
        }
    }

    fn finish(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn import_takes_a_file_and_a_valid_version_name() {
        let cli = Cli::try_parse_from([
            "deskgrid",
            "image",
            "import",
            "disk.qcow2",
            "--name",
            "win11-2026.11",
        ])
        .unwrap_or_else(|error| panic!("{error}"));
        let Command::Image(ImageCommand::Import(args)) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(args.file, PathBuf::from("disk.qcow2"));
        assert_eq!(args.name.to_string(), "win11-2026.11");
        assert!(Cli::try_parse_from(["deskgrid", "image", "import", "disk.raw"]).is_err());
        assert!(
            Cli::try_parse_from(["deskgrid", "image", "import", "d", "--name", "bad name"])
                .is_err()
        );
    }

    #[test]
    fn publish_diff_takes_an_overlay_a_parent_and_a_name() {
        let cli = Cli::try_parse_from([
            "deskgrid",
            "image",
            "publish-diff",
            "update.qcow2",
            "--parent",
            "office-v1",
            "--name",
            "office-v2",
        ])
        .unwrap_or_else(|error| panic!("{error}"));
        let Command::Image(ImageCommand::PublishDiff(args)) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(args.overlay, PathBuf::from("update.qcow2"));
        assert_eq!(args.parent.to_string(), "office-v1");
        assert_eq!(args.name.to_string(), "office-v2");
        assert!(Cli::try_parse_from([
            "deskgrid",
            "image",
            "publish-diff",
            "u.qcow2",
            "--name",
            "office-v2"
        ])
        .is_err());
    }
}
