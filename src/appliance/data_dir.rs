//! The data directory's layout, its creation, and the lock that makes one
//! `deskgrid serve` its only writer.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::model::ServerId;
use crate::state::storage::fsync_dir;

/// Where deskgrid keeps its files unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/deskgrid";

/// Paths inside a data directory (DESIGN.md section 8).
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{path} is already initialised (it has a config.toml); use another --data-dir or remove it first")]
    AlreadyInitialised { path: PathBuf },
    #[error(
        "{path} is not a deskgrid data directory: run `deskgrid init --data-dir {path}` first"
    )]
    NotInitialised { path: PathBuf },
    #[error("a deskgrid server is already running on {path}")]
    Locked { path: PathBuf },
    #[error("cannot {operation} {path}")]
    Io {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not hold a server id")]
    BadServerId { path: PathBuf },
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_file(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    pub fn server_id_file(&self) -> PathBuf {
        self.root.join("server-id")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    /// The HTTPS API's certificate and key (`tls-cert.pem`, `tls-key.pem`).
    pub fn api_dir(&self) -> PathBuf {
        self.root.join("api")
    }

    pub fn transfer_dir(&self) -> PathBuf {
        self.root.join("transfer")
    }

    /// The local control socket the CLI talks to while a server runs.
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    fn lock_file(&self) -> PathBuf {
        self.root.join("lock")
    }

    pub fn is_initialised(&self) -> bool {
        self.config_file().exists()
    }

    /// Creates the directory tree (mode 0700: it holds keys and user data),
    /// a new server id and `config.toml`. Refuses an initialised directory.
    pub fn create(&self, config_text: &str) -> Result<ServerId, DataDirError> {
        self.create_with_id(config_text, ServerId::random())
    }

    /// As [`create`](Self::create), for a server whose id is already chosen
    /// (a joining server's id is in the certificate the grid issued).
    pub fn create_with_id(
        &self,
        config_text: &str,
        server_id: ServerId,
    ) -> Result<ServerId, DataDirError> {
        if self.is_initialised() {
            return Err(DataDirError::AlreadyInitialised {
                path: self.root.clone(),
            });
        }
        for dir in [
            self.root.clone(),
            self.state_dir(),
            self.tls_dir(),
            self.transfer_dir(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_error(&dir, "create directory"))?;
        }
        write_file_atomically(
            &self.server_id_file(),
            format!("{server_id}\n").as_bytes(),
            0o600,
        )?;
        // config.toml last: its presence is what marks the directory initialised.
        write_file_atomically(&self.config_file(), config_text.as_bytes(), 0o600)?;
        Ok(server_id)
    }

    /// Refuses a directory that already holds a server.
    pub fn require_uninitialised(&self) -> Result<(), DataDirError> {
        if self.is_initialised() {
            Err(DataDirError::AlreadyInitialised {
                path: self.root.clone(),
            })
        } else {
            Ok(())
        }
    }

    pub fn require_initialised(&self) -> Result<(), DataDirError> {
        if self.is_initialised() {
            Ok(())
        } else {
            Err(DataDirError::NotInitialised {
                path: self.root.clone(),
            })
        }
    }

    pub fn server_id(&self) -> Result<ServerId, DataDirError> {
        let path = self.server_id_file();
        let text = fs::read_to_string(&path).map_err(io_error(&path, "read"))?;
        text.trim()
            .parse()
            .map_err(|_| DataDirError::BadServerId { path })
    }

    /// Takes the exclusive lock that `deskgrid serve` holds while it runs.
    pub fn lock_exclusive(&self) -> Result<DataDirLock, DataDirError> {
        let path = self.lock_file();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error(&path, "open"))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(DataDirLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(DataDirError::Locked {
                path: self.root.clone(),
            }),
            Err((_, errno)) => Err(DataDirError::Io {
                path,
                operation: "lock",
                source: errno.into(),
            }),
        }
    }

    /// True while some process holds the server lock.
    pub fn is_locked(&self) -> bool {
        let Ok(file) = File::open(self.lock_file()) else {
            return false;
        };
        Flock::lock(file, FlockArg::LockSharedNonblock).is_err()
    }
}

/// Held by a running server; released when dropped or when the process dies.
#[derive(Debug)]
pub struct DataDirLock {
    _lock: Flock<File>,
}

fn io_error<'a>(
    path: &'a Path,
    operation: &'static str,
) -> impl FnOnce(std::io::Error) -> DataDirError + 'a {
    move |source| DataDirError::Io {
        path: path.to_owned(),
        operation,
        source,
    }
}

/// Write-temp, fsync, rename, fsync(dir): the file is either old or new, whole.
pub fn write_file_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DataDirError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy())
        .unwrap_or_default();
    let temp = dir.join(format!(".{file_name}.tmp"));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&temp)
        .map_err(io_error(&temp, "create"))?;
    file.write_all(bytes).map_err(io_error(&temp, "write"))?;
    file.sync_all().map_err(io_error(&temp, "fsync"))?;
    fs::rename(&temp, path).map_err(io_error(path, "rename into place"))?;
    fsync_dir(dir).map_err(|error| DataDirError::Io {
        path: dir.to_owned(),
        operation: "fsync",
        source: std::io::Error::other(error.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn create_makes_a_private_tree_once() {
        let parent = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(parent.path().join("data"));
        let id = data_dir.create("# config\n").unwrap();
        assert_eq!(data_dir.server_id().unwrap(), id);
        let mode = fs::metadata(data_dir.root()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let mode = fs::metadata(data_dir.config_file())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            data_dir.create("# again\n"),
            Err(DataDirError::AlreadyInitialised { .. })
        ));
    }

    #[test]
    fn only_one_holder_of_the_lock() {
        let parent = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(parent.path());
        data_dir.create("").unwrap();
        assert!(!data_dir.is_locked());
        let lock = data_dir.lock_exclusive().unwrap();
        assert!(data_dir.is_locked());
        assert!(matches!(
            data_dir.lock_exclusive(),
            Err(DataDirError::Locked { .. })
        ));
        drop(lock);
        assert!(!data_dir.is_locked());
        data_dir.lock_exclusive().unwrap();
    }
}
