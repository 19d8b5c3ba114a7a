//! "Should we balance at all?": what changed between two views that a
//! balancer would act on (the seed's analysis step).
//!
//! Each view is reduced to the facts the balancers read: which servers count
//! and may get work and their capacity totals; which images each holds and
//! whether complete; VMs per template, failed and outdated VMs; per template
//! its image, minimum replicas and desired count; image states; the policy.
//! A template property the balancers do not read (vCPUs, memory, display,
//! monitors, kind) triggers nothing; a desired count that moved by less than
//! the policy's threshold triggers nothing either.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{
    HostCapacity, ImageHolding, ImageState, ImageVersionId, Policy, ServerId, TemplateName, VmState,
};

use super::balance::desired_vms;
use super::{GridView, Liveness};

/// Which balancers have work, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    pub static_balance: bool,
    pub dynamic_balance: bool,
    pub reasons: Vec<String>,
}

impl Analysis {
    pub fn any(&self) -> bool {
        self.static_balance || self.dynamic_balance
    }

    fn both(&mut self, reason: String) {
        self.static_balance = true;
        self.dynamic_balance = true;
        self.reasons.push(reason);
    }

    fn dynamic(&mut self, reason: String) {
        self.dynamic_balance = true;
        self.reasons.push(reason);
    }
}

#[derive(Debug, PartialEq, Eq)]
struct ServerFacts<'a> {
    liveness: Liveness,
    cpus: u32,
    memory_total_mib: u64,
    /// Whole GiB, so that the free space moving as VM disks grow is not news.
    storage_free_gib: u64,
    images: BTreeMap<&'a ImageVersionId, bool>,
    /// (template, counted as allocated) -> VMs
    vms: BTreeMap<(&'a TemplateName, bool), u32>,
    failed: u32,
}

#[derive(Debug, PartialEq, Eq)]
struct TemplateFacts<'a> {
    image: &'a ImageVersionId,
    min_replicas: u32,
    desired: u32,
}

struct Facts<'a> {
    servers: BTreeMap<ServerId, ServerFacts<'a>>,
    templates: BTreeMap<&'a TemplateName, TemplateFacts<'a>>,
    images: BTreeMap<&'a ImageVersionId, ImageState>,
    policy: &'a Policy,
}

fn facts<'a>(view: &'a GridView<'a>) -> Facts<'a> {
    let mut in_use: BTreeMap<&TemplateName, u32> = BTreeMap::new();
    let mut servers = BTreeMap::new();
    for server in view.servers() {
        let record = server.record;
        let HostCapacity {
            cpus,
            memory_total_mib,
            storage_free_bytes,
            ..
        } = record.capacity;
        let mut vms: BTreeMap<(&TemplateName, bool), u32> = BTreeMap::new();
        let mut failed = 0;
        for vm in record.vms.values() {
            if vm.state == VmState::Failed {
                failed += 1;
                continue;
            }
            if server.counts() && matches!(vm.state, VmState::Reserved | VmState::InUse) {
                *in_use.entry(&vm.template).or_default() += 1;
            }
            let current = view
                .templates()
                .binary_search_by(|template| template.name.cmp(&vm.template))
                .is_ok_and(|index| view.templates()[index].image == vm.image);
            *vms.entry((&vm.template, current)).or_default() += 1;
        }
        let images = record
            .images
            .iter()
            .map(|(image, holding)| (image, matches!(holding, ImageHolding::Complete)))
            .collect();
        servers.insert(
            server.id,
            ServerFacts {
                liveness: server.liveness,
                cpus,
                memory_total_mib,
                storage_free_gib: storage_free_bytes >> 30,
                images,
                vms,
                failed,
            },
        );
    }
    let templates = view
        .templates()
        .iter()
        .map(|template| {
            let desired = desired_vms(
                template,
                view.entitled_users(&template.name),
                in_use.get(&template.name).copied().unwrap_or(0),
            );
            (
                &template.name,
                TemplateFacts {
                    image: &template.image,
                    min_replicas: template.min_replicas,
                    desired,
                },
            )
        })
        .collect();
    let images = view
        .images
        .iter()
        .map(|(id, image)| (*id, image.state))
        .collect();
    Facts {
        servers,
        templates,
        images,
        policy: view.policy(),
    }
}

/// Compares the view a server last planned on with the new one.
pub fn analyze(previous: &GridView<'_>, next: &GridView<'_>) -> Analysis {
    let before = facts(previous);
    let after = facts(next);
    let mut analysis = Analysis::default();
    if before.policy != after.policy {
        analysis.both("the policy changed".to_owned());
    }
    for (id, server) in &after.servers {
        match before.servers.get(id) {
            None => analysis.both(format!("server {id} is new")),
            Some(old) if old.liveness != server.liveness => analysis.both(format!(
                "server {id} went from {:?} to {:?}",
                old.liveness, server.liveness
            )),
            Some(old)
                if (old.cpus, old.memory_total_mib, old.storage_free_gib)
                    != (
                        server.cpus,
                        server.memory_total_mib,
                        server.storage_free_gib,
                    ) =>
            {
                analysis.both(format!("server {id}'s capacity changed"));
            }
            Some(old) if old.images != server.images => {
                analysis.both(format!("server {id}'s images changed"));
            }
            Some(old) if old.failed < server.failed => {
                analysis.dynamic(format!("a VM failed on server {id}"));
            }
            Some(old) if old.vms != server.vms => {
                analysis.dynamic(format!("server {id}'s VMs changed"));
            }
            Some(_) => {}
        }
    }
    for id in before.servers.keys() {
        if !after.servers.contains_key(id) {
            analysis.both(format!("server {id} left the grid"));
        }
    }
    let threshold = i64::from(after.policy.desired_change_threshold);
    for (name, template) in &after.templates {
        let Some(old) = before.templates.get(name) else {
            analysis.both(format!("template {name} is new"));
            continue;
        };
        if old.image != template.image {
            analysis.both(format!("template {name} moved to image {}", template.image));
        } else if old.min_replicas != template.min_replicas {
            analysis.static_balance = true;
            analysis
                .reasons
                .push(format!("template {name}'s minimum replicas changed"));
        }
        let change = i64::from(template.desired) - i64::from(old.desired);
        if change != 0 && change.abs() >= threshold.max(1) {
            analysis.dynamic(format!(
                "template {name} wants {} VMs instead of {}",
                template.desired, old.desired
            ));
        }
    }
    for name in before.templates.keys() {
        if !after.templates.contains_key(name) {
            analysis.both(format!("template {name} was deleted"));
        }
    }
    if before.images != after.images {
        analysis.both("image versions changed".to_owned());
    }
    analysis
}
