//! The replicated grid state and its merge rules.
//!
//! Two kinds of data, as DESIGN.md section 4 lays out:
//!
//! - **Grid-wide configuration** (templates, images, users, ...): any server may
//!   write it. Each key holds a last-writer-wins register ordered by its
//!   [`Stamp`] (hybrid logical clock, then server id); a delete writes a
//!   tombstone (`value: None`) so that it wins over older writes too.
//! - **Server records**: written only by the server they describe, each with a
//!   version; the higher version wins.
//!
//! Every write a server makes takes the next number of that server's sequence,
//! and a [`VersionVector`] summarises, per origin server, the sequence numbers
//! a replica reflects. That is what makes `delta_since` cheap and exact.
//!
//! # Laws
//!
//! With `⊔` the merge ([`GridState::join`], or [`GridState::apply_delta`] of a
//! whole state), for all replicas `a`, `b`, `c`:
//!
//! - `a ⊔ b = b ⊔ a` (commutative)
//! - `(a ⊔ b) ⊔ c = a ⊔ (b ⊔ c)` (associative)
//! - `a ⊔ a = a` (idempotent)
//!
//! so replicas that have received the same updates, in any order, batched or
//! duplicated in any way, hold the same content ([`GridState::digest`]).
//! `tests/state_merge_laws.rs` proves these with proptest.
//!
//! # The version vector invariant
//!
//! **Invariant:** if `seen[o] = n`, this replica reflects every write of server
//! `o` with sequence number `<= n`: the entry under that write's key has a stamp
//! at least as high. A replica that merges a delta built by
//! `delta_since(since)` from a source whose vector is `upto` may raise its own
//! vector to `upto` only if its vector already dominates `since`: the delta
//! then holds everything the source reflects beyond `since`. Otherwise it
//! merges the entries (always safe) and leaves its vector alone; anti-entropy
//! fills the gap later.
//!
//! **Invariant:** nothing here does I/O, reads a clock or draws random numbers.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::hlc::Hlc;
use crate::model::{
    BaseImage, Entitlement, Group, GroupName, ImageVersionId, JoinToken, ModelError, Policy,
    ServerId, ServerRecord, Template, TemplateName, User, UserName,
};

/// The most entries one delta (or a whole state) may carry: far above any real
/// grid (thousands of servers, tens of thousands of users), low enough that a
/// hostile peer cannot make us allocate without bound.
pub const MAX_DELTA_ENTRIES: usize = 1_000_000;

/// Orders writes to grid-wide configuration: hybrid logical clock first, then
/// the writing server's id, so two writes never tie; `seq` is the write's
/// number in its origin's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub hlc: Hlc,
    pub origin: ServerId,
    pub seq: u64,
}

/// The key of a grid-wide configuration register.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigKey {
    Policy,
    Template(TemplateName),
    Image(ImageVersionId),
    User(UserName),
    Group(GroupName),
    Entitlement(Entitlement),
    /// Hex SHA-256 of a join token's secret.
    JoinToken(String),
    /// A server whose certificate is revoked: it may never rejoin.
    RevokedServer(ServerId),
}

/// The value of a grid-wide configuration register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigValue {
    Policy(Policy),
    Template(Template),
    Image(BaseImage),
    User(User),
    Group(Group),
    Entitlement(Entitlement),
    JoinToken(JoinToken),
    RevokedServer(ServerId),
}

impl ConfigValue {
    /// The key this value is stored under.
    pub fn key(&self) -> ConfigKey {
        match self {
            Self::Policy(_) => ConfigKey::Policy,
            Self::Template(template) => ConfigKey::Template(template.name.clone()),
            Self::Image(image) => ConfigKey::Image(image.id.clone()),
            Self::User(user) => ConfigKey::User(user.name.clone()),
            Self::Group(group) => ConfigKey::Group(group.name.clone()),
            Self::Entitlement(entitlement) => ConfigKey::Entitlement(entitlement.clone()),
            Self::JoinToken(token) => ConfigKey::JoinToken(token.secret_hash.clone()),
            Self::RevokedServer(server) => ConfigKey::RevokedServer(*server),
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            Self::Policy(policy) => policy.validate(),
            Self::Template(template) => template.validate(),
            Self::Image(image) => image.validate(),
            Self::User(user) => user.validate(),
            Self::Group(group) => group.validate(),
            Self::JoinToken(token) => token.validate(),
            Self::Entitlement(_) | Self::RevokedServer(_) => Ok(()),
        }
    }
}

/// One register: the winning write, or a tombstone when `value` is `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigEntry {
    pub stamp: Stamp,
    pub value: Option<ConfigValue>,
}

/// A server's own record with the version its writer gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// The record's number in its server's write sequence.
    pub version: u64,
    pub hlc: Hlc,
    pub record: ServerRecord,
}

/// Per origin server, the highest sequence number a replica reflects entirely.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionVector(BTreeMap<ServerId, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest sequence number of `origin` reflected (0: none).
    pub fn get(&self, origin: ServerId) -> u64 {
        self.0.get(&origin).copied().unwrap_or(0)
    }

    pub fn set(&mut self, origin: ServerId, seq: u64) {
        if seq == 0 {
            self.0.remove(&origin);
        } else {
            self.0.insert(origin, seq);
        }
    }

    /// True when this vector is at least `other` for every origin.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other
            .0
            .iter()
            .all(|(origin, seq)| self.get(*origin) >= *seq)
    }

    /// Pointwise maximum.
    pub fn join(&mut self, other: &VersionVector) {
        for (origin, seq) in &other.0 {
            let entry = self.0.entry(*origin).or_insert(0);
            *entry = (*entry).max(*seq);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (ServerId, u64)> + '_ {
        self.0.iter().map(|(origin, seq)| (*origin, *seq))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A batch of updates: what a replica lacks, a local write, or a whole state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The vector the delta was computed against.
    pub since: VersionVector,
    /// The source's vector when it computed the delta.
    pub upto: VersionVector,
    pub config: Vec<(ConfigKey, ConfigEntry)>,
    pub servers: Vec<(ServerId, ServerEntry)>,
}

impl Delta {
    /// Number of updates it carries.
    pub fn len(&self) -> usize {
        self.config.len() + self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.config.is_empty() && self.servers.is_empty()
    }

    /// Checks everything a peer or a file could get wrong, before any of it is
    /// applied: sizes, keys matching values, every value's own limits.
    pub fn validate(&self) -> Result<(), MergeError> {
        let count = self.len();
        if count > MAX_DELTA_ENTRIES {
            return Err(MergeError::TooManyEntries {
                count,
                max: MAX_DELTA_ENTRIES,
            });
        }
        for (key, entry) in &self.config {
            if entry.stamp.seq == 0 {
                return Err(MergeError::ZeroSequence {
                    what: format!("{key:?}"),
                });
            }
            if let Some(value) = &entry.value {
                if value.key() != *key {
                    return Err(MergeError::KeyMismatch {
                        key: format!("{key:?}"),
                    });
                }
                value
                    .validate()
                    .map_err(|source| MergeError::InvalidValue {
                        key: format!("{key:?}"),
                        source,
                    })?;
            }
        }
        for (server, entry) in &self.servers {
            if entry.version == 0 {
                return Err(MergeError::ZeroSequence {
                    what: format!("{server:?}"),
                });
            }
            entry
                .record
                .validate()
                .map_err(|source| MergeError::InvalidServerRecord {
                    server: *server,
                    source,
                })?;
        }
        Ok(())
    }
}

/// Why a delta or a local write was refused. Nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("delta has {count} entries, the limit is {max}")]
    TooManyEntries { count: usize, max: usize },
    #[error("entry {what} has sequence number 0")]
    ZeroSequence { what: String },
    #[error("entry {key} holds a value that belongs under another key")]
    KeyMismatch { key: String },
    #[error("entry {key} is invalid")]
    InvalidValue {
        key: String,
        #[source]
        source: ModelError,
    },
    #[error("record of server {server} is invalid")]
    InvalidServerRecord {
        server: ServerId,
        #[source]
        source: ModelError,
    },
}

/// One replica of the grid state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GridState {
    config: BTreeMap<ConfigKey, ConfigEntry>,
    servers: BTreeMap<ServerId, ServerEntry>,
    seen: VersionVector,
}

impl GridState {
    pub fn new() -> Self {
        Self::default()
    }

    /// What this replica reflects, per origin.
    pub fn version_vector(&self) -> &VersionVector {
        &self.seen
    }

    /// Builds (without applying) the delta that writes — or with `None`
    /// deletes — a configuration register as server `origin` at time `hlc`.
    /// The caller persists it, then applies it with [`apply_delta`](Self::apply_delta),
    /// so that memory never holds a write the disk does not.
    ///
    /// Precondition: `origin` is the server that owns this replica, and `hlc`
    /// comes from its clock (so it is higher than anything it has seen).
    pub fn prepare_config_write(
        &self,
        origin: ServerId,
        hlc: Hlc,
        key: ConfigKey,
        value: Option<ConfigValue>,
    ) -> Result<Delta, MergeError> {
        let seq = self.seen.get(origin) + 1;
        let delta = Delta {
            since: single(origin, seq - 1),
            upto: single(origin, seq),
            config: vec![(
                key,
                ConfigEntry {
                    stamp: Stamp { hlc, origin, seq },
                    value,
                },
            )],
            servers: Vec::new(),
        };
        delta.validate()?;
        Ok(delta)
    }

    /// Builds (without applying) the delta that replaces server `origin`'s own
    /// record; the same precondition as [`prepare_config_write`](Self::prepare_config_write) holds.
    pub fn prepare_server_update(
        &self,
        origin: ServerId,
        hlc: Hlc,
        record: ServerRecord,
    ) -> Result<Delta, MergeError> {
        let seq = self.seen.get(origin) + 1;
        let delta = Delta {
            since: single(origin, seq - 1),
            upto: single(origin, seq),
            config: Vec::new(),
            servers: vec![(
                origin,
                ServerEntry {
                    version: seq,
                    hlc,
                    record,
                },
            )],
        };
        delta.validate()?;
        Ok(delta)
    }

    /// Prepares and applies a configuration write (in-memory replicas, tests).
    pub fn write_config(
        &mut self,
        origin: ServerId,
        hlc: Hlc,
        key: ConfigKey,
        value: Option<ConfigValue>,
    ) -> Result<Delta, MergeError> {
        let delta = self.prepare_config_write(origin, hlc, key, value)?;
        self.apply_delta(&delta)?;
        Ok(delta)
    }

    /// Stores `value` under its own key (see [`write_config`](Self::write_config)).
    pub fn put_config(
        &mut self,
        origin: ServerId,
        hlc: Hlc,
        value: ConfigValue,
    ) -> Result<Delta, MergeError> {
        self.write_config(origin, hlc, value.key(), Some(value))
    }

    /// Prepares and applies an update of server `origin`'s own record.
    pub fn update_server(
        &mut self,
        origin: ServerId,
        hlc: Hlc,
        record: ServerRecord,
    ) -> Result<Delta, MergeError> {
        let delta = self.prepare_server_update(origin, hlc, record)?;
        self.apply_delta(&delta)?;
        Ok(delta)
    }

    /// Merges a delta: validated whole first, then applied entry by entry.
    /// Returns how many entries changed here.
    pub fn apply_delta(&mut self, delta: &Delta) -> Result<usize, MergeError> {
        delta.validate()?;
        let mut changed = 0;
        for (key, entry) in &delta.config {
            changed += usize::from(merge_config_entry(&mut self.config, key, entry));
        }
        for (server, entry) in &delta.servers {
            changed += usize::from(merge_server_entry(&mut self.servers, *server, entry));
        }
        if self.seen.dominates(&delta.since) {
            self.seen.join(&delta.upto);
        }
        Ok(changed)
    }

    /// The part of `delta` that would change this replica: its entries that
    /// win here, with its vectors kept (so applying the result moves the
    /// version vector exactly as applying `delta` would). Lets a server skip
    /// logging what it already has.
    pub fn novel_part(&self, delta: &Delta) -> Delta {
        let config = delta
            .config
            .iter()
            .filter(|(key, entry)| {
                self.config
                    .get(key)
                    .is_none_or(|current| config_wins(entry, current))
            })
            .cloned()
            .collect();
        let servers = delta
            .servers
            .iter()
            .filter(|(server, entry)| {
                self.servers
                    .get(server)
                    .is_none_or(|current| server_wins(entry, current))
            })
            .cloned()
            .collect();
        Delta {
            since: delta.since.clone(),
            upto: delta.upto.clone(),
            config,
            servers,
        }
    }

    /// True when applying a delta with these vectors would raise ours.
    pub fn would_advance(&self, delta: &Delta) -> bool {
        self.seen.dominates(&delta.since) && !self.seen.dominates(&delta.upto)
    }

    /// Merges another whole replica into this one (`self ⊔ other`).
    pub fn join(&mut self, other: &GridState) {
        for (key, entry) in &other.config {
            merge_config_entry(&mut self.config, key, entry);
        }
        for (server, entry) in &other.servers {
            merge_server_entry(&mut self.servers, *server, entry);
        }
        self.seen.join(&other.seen);
    }

    /// Everything this replica has that a replica with vector `since` may lack.
    pub fn delta_since(&self, since: &VersionVector) -> Delta {
        Delta {
            since: since.clone(),
            upto: self.seen.clone(),
            config: self
                .config
                .iter()
                .filter(|(_, entry)| entry.stamp.seq > since.get(entry.stamp.origin))
                .map(|(key, entry)| (key.clone(), entry.clone()))
                .collect(),
            servers: self
                .servers
                .iter()
                .filter(|(server, entry)| entry.version > since.get(**server))
                .map(|(server, entry)| (*server, entry.clone()))
                .collect(),
        }
    }

    /// The whole state as one delta (snapshots, a joining server's first pull).
    pub fn to_delta(&self) -> Delta {
        self.delta_since(&VersionVector::new())
    }

    /// Rebuilds a replica from [`to_delta`](Self::to_delta)'s output.
    pub fn from_delta(delta: &Delta) -> Result<Self, MergeError> {
        let mut state = Self::new();
        state.apply_delta(delta)?;
        Ok(state)
    }

    /// SHA-256 of the content (registers and server records, not the version
    /// vector, which is only a lower bound of what a replica reflects). Equal
    /// digests mean equal content on every server.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for (key, entry) in &self.config {
            hash_canonical(&mut hasher, &(key, entry));
        }
        hasher.update([0xff]);
        for (server, entry) in &self.servers {
            hash_canonical(&mut hasher, &(server, entry));
        }
        hasher.finalize().into()
    }

    /// The live value under `key` (a tombstone reads as absent).
    pub fn config(&self, key: &ConfigKey) -> Option<&ConfigValue> {
        self.config.get(key).and_then(|entry| entry.value.as_ref())
    }

    /// Live configuration values in key order.
    pub fn config_values(&self) -> impl Iterator<Item = &ConfigValue> {
        self.config
            .values()
            .filter_map(|entry| entry.value.as_ref())
    }

    /// Every register, tombstones included, in key order.
    pub fn config_entries(&self) -> impl Iterator<Item = (&ConfigKey, &ConfigEntry)> {
        self.config.iter()
    }

    pub fn templates(&self) -> impl Iterator<Item = &Template> {
        self.config_values().filter_map(|value| match value {
            ConfigValue::Template(template) => Some(template),
            _ => None,
        })
    }

    /// The grid's policy, or the default when nobody has set one.
    pub fn policy(&self) -> Policy {
        match self.config(&ConfigKey::Policy) {
            Some(ConfigValue::Policy(policy)) => policy.clone(),
            _ => Policy::default(),
        }
    }

    pub fn server(&self, id: ServerId) -> Option<&ServerRecord> {
        self.servers.get(&id).map(|entry| &entry.record)
    }

    /// Server records in id order.
    pub fn servers(&self) -> impl Iterator<Item = (ServerId, &ServerRecord)> {
        self.servers.iter().map(|(id, entry)| (*id, &entry.record))
    }

    /// Registers (tombstones included) plus server records.
    pub fn entry_count(&self) -> usize {
        self.config.len() + self.servers.len()
    }

    /// The newest clock reading in the state, so a restarted server's clock
    /// continues after everything it wrote before.
    pub fn max_hlc(&self) -> Hlc {
        let config = self.config.values().map(|entry| entry.stamp.hlc);
        let servers = self.servers.values().map(|entry| entry.hlc);
        config.chain(servers).max().unwrap_or_default()
    }
}

fn single(origin: ServerId, seq: u64) -> VersionVector {
    let mut vector = VersionVector::new();
    vector.set(origin, seq);
    vector
}

/// Whether `incoming` beats `current` in a configuration register: the higher
/// stamp wins. Honest servers never reuse (origin, seq); if a broken one does,
/// the canonical bytes still pick the same winner everywhere.
fn config_wins(incoming: &ConfigEntry, current: &ConfigEntry) -> bool {
    match incoming.stamp.cmp(&current.stamp) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => canonical_bytes(&incoming.value) > canonical_bytes(&current.value),
    }
}

/// Whether `incoming` beats `current` as a server's record: higher version.
fn server_wins(incoming: &ServerEntry, current: &ServerEntry) -> bool {
    match (incoming.version, incoming.hlc).cmp(&(current.version, current.hlc)) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => canonical_bytes(&incoming.record) > canonical_bytes(&current.record),
    }
}

/// Keeps the higher of two writes under `key`; true when `incoming` won.
fn merge_config_entry(
    config: &mut BTreeMap<ConfigKey, ConfigEntry>,
    key: &ConfigKey,
    incoming: &ConfigEntry,
) -> bool {
    match config.get_mut(key) {
        Some(current) if !config_wins(incoming, current) => false,
        Some(current) => {
            *current = incoming.clone();
            true
        }
        None => {
            config.insert(key.clone(), incoming.clone());
            true
        }
    }
}

/// Keeps the higher version of a server's record; true when `incoming` won.
fn merge_server_entry(
    servers: &mut BTreeMap<ServerId, ServerEntry>,
    server: ServerId,
    incoming: &ServerEntry,
) -> bool {
    match servers.get_mut(&server) {
        Some(current) if !server_wins(incoming, current) => false,
        Some(current) => {
            *current = incoming.clone();
            true
        }
        None => {
            servers.insert(server, incoming.clone());
            true
        }
    }
}

fn canonical_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = Vec::new();
    // Writing plain data into a Vec cannot fail: no I/O, no non-string map keys
    // that CBOR could refuse.
    ciborium::into_writer(value, &mut bytes)
        .expect("CBOR encoding of state values into memory cannot fail");
    bytes
}

fn hash_canonical<T: Serialize>(hasher: &mut Sha256, value: &T) {
    let bytes = canonical_bytes(value);
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(&bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sample_template;

    fn server(byte: u8) -> ServerId {
        ServerId::from_bytes([byte; 16])
    }

    fn hlc(ms: u64) -> Hlc {
        Hlc {
            physical_ms: ms,
            logical: 0,
        }
    }

    #[test]
    fn later_write_wins_and_tombstone_deletes() {
        let mut state = GridState::new();
        let mut template = sample_template("office");
        state
            .put_config(server(1), hlc(10), ConfigValue::Template(template.clone()))
            .unwrap();
        template.desired_vms = 20;
        state
            .put_config(server(1), hlc(20), ConfigValue::Template(template.clone()))
            .unwrap();
        let key = ConfigKey::Template(template.name.clone());
        assert_eq!(state.config(&key), Some(&ConfigValue::Template(template)));

        state
            .write_config(server(1), hlc(30), key.clone(), None)
            .unwrap();
        assert_eq!(state.config(&key), None);
        assert_eq!(state.templates().count(), 0);
        assert_eq!(state.version_vector().get(server(1)), 3);
    }

    #[test]
    fn an_older_write_arriving_late_loses() {
        let mut a = GridState::new();
        let mut b = GridState::new();
        let old = a
            .put_config(
                server(1),
                hlc(10),
                ConfigValue::Template(sample_template("t")),
            )
            .unwrap();
        let mut newer = sample_template("t");
        newer.vcpus = 8;
        let new = b
            .put_config(server(2), hlc(20), ConfigValue::Template(newer.clone()))
            .unwrap();
        a.apply_delta(&new).unwrap();
        b.apply_delta(&old).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.templates().next().map(|t| t.vcpus), Some(8));
    }

    #[test]
    fn invalid_delta_is_refused_whole() {
        let mut state = GridState::new();
        let mut bad = sample_template("bad");
        bad.vcpus = 0;
        let good = sample_template("good");
        let delta = Delta {
            since: VersionVector::new(),
            upto: single(server(1), 2),
            config: vec![
                (
                    ConfigKey::Template(good.name.clone()),
                    ConfigEntry {
                        stamp: Stamp {
                            hlc: hlc(1),
                            origin: server(1),
                            seq: 1,
                        },
                        value: Some(ConfigValue::Template(good)),
                    },
                ),
                (
                    ConfigKey::Template(bad.name.clone()),
                    ConfigEntry {
                        stamp: Stamp {
                            hlc: hlc(2),
                            origin: server(1),
                            seq: 2,
                        },
                        value: Some(ConfigValue::Template(bad)),
                    },
                ),
            ],
            servers: Vec::new(),
        };
        let error = state.apply_delta(&delta).unwrap_err();
        assert!(matches!(error, MergeError::InvalidValue { .. }), "{error}");
        assert_eq!(
            state,
            GridState::new(),
            "nothing of a refused delta is applied"
        );
    }

    #[test]
    fn a_value_under_the_wrong_key_is_refused() {
        let mut state = GridState::new();
        let error = state
            .write_config(
                server(1),
                hlc(1),
                ConfigKey::Template(TemplateName::new("other").unwrap()),
                Some(ConfigValue::Template(sample_template("t"))),
            )
            .unwrap_err();
        assert!(matches!(error, MergeError::KeyMismatch { .. }));
        assert_eq!(state.version_vector().get(server(1)), 0);
    }

    #[test]
    fn a_gap_keeps_the_version_vector_back_until_filled() {
        let mut source = GridState::new();
        let first = source
            .put_config(
                server(1),
                hlc(1),
                ConfigValue::Template(sample_template("a")),
            )
            .unwrap();
        let second = source
            .put_config(
                server(1),
                hlc(2),
                ConfigValue::Template(sample_template("b")),
            )
            .unwrap();
        let mut replica = GridState::new();
        replica.apply_delta(&second).unwrap();
        assert_eq!(
            replica.version_vector().get(server(1)),
            0,
            "seq 1 is still missing"
        );
        replica.apply_delta(&first).unwrap();
        assert_eq!(replica.version_vector().get(server(1)), 1);
        replica
            .apply_delta(&source.delta_since(replica.version_vector()))
            .unwrap();
        assert_eq!(replica.version_vector(), source.version_vector());
        assert_eq!(replica.digest(), source.digest());
    }

    #[test]
    fn server_records_keep_the_highest_version() {
        let mut a = GridState::new();
        let record = |name: &str| ServerRecord::new(name.into(), vec![], Default::default(), 0);
        let v1 = a.update_server(server(1), hlc(1), record("one")).unwrap();
        let v2 = a.update_server(server(1), hlc(2), record("two")).unwrap();
        let mut b = GridState::new();
        b.apply_delta(&v2).unwrap();
        b.apply_delta(&v1).unwrap();
        assert_eq!(b.server(server(1)).map(|r| r.name.as_str()), Some("two"));
    }

    #[test]
    fn whole_state_round_trips_through_a_delta() {
        let mut state = GridState::new();
        state
            .put_config(
                server(1),
                hlc(5),
                ConfigValue::Template(sample_template("x")),
            )
            .unwrap();
        state
            .update_server(
                server(2),
                hlc(6),
                ServerRecord::new("s".into(), vec![], Default::default(), 6),
            )
            .unwrap();
        let copy = GridState::from_delta(&state.to_delta()).unwrap();
        assert_eq!(copy, state);
        assert_eq!(copy.max_hlc(), hlc(6));
    }
}
