//! Random grids for the placement laws and benchmark, and a simulated
//! "every server carried out its steps" (shared by tests/placement_laws.rs
//! and benches/placement.rs through `#[path]`).

#![allow(dead_code)]

use std::collections::BTreeMap;

use deskgrid::model::{
    BaseImage, HostCapacity, ImageDigest, ImageHolding, ImageState, ImageVersionId, Policy,
    ServerId, ServerRecord, SiteLabel, Template, TemplateKind, TemplateName, UserName, VmId,
    VmRecord, VmState,
};
use deskgrid::placement::{Action, GridView, Liveness, Plan, ServerView};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const GIB: u64 = 1 << 30;

/// The shape of a random grid.
#[derive(Debug, Clone)]
pub struct GridSpec {
    pub servers: usize,
    pub templates: usize,
    /// Images are shared by templates: `templates / images_per_template_ratio`.
    pub images: usize,
    pub sites: usize,
    /// Per mille of servers that are suspect / missing.
    pub suspect_permille: u32,
    pub missing_permille: u32,
    /// Per mille chance that a server holds a given image already.
    pub holding_permille: u32,
    /// Existing VMs to scatter (on holders, within their budgets).
    pub vms: usize,
    /// Desired VMs per template (up to).
    pub max_desired: u32,
    /// Give every server plenty of memory, CPU and disk.
    pub ample: bool,
}

impl GridSpec {
    pub fn small(servers: usize, templates: usize) -> Self {
        Self {
            servers,
            templates,
            images: templates.div_ceil(2),
            sites: 3,
            suspect_permille: 50,
            missing_permille: 100,
            holding_permille: 300,
            vms: servers * 4,
            max_desired: 40,
            ample: false,
        }
    }
}

/// An owned grid the tests change, and views of it.
#[derive(Debug, Clone)]
pub struct Grid {
    pub servers: Vec<(ServerId, ServerRecord, Liveness)>,
    pub templates: Vec<Template>,
    pub images: Vec<BaseImage>,
    pub entitled: Vec<(TemplateName, u32)>,
    pub policy: Policy,
    next_vm: u64,
}

pub fn server_id(index: usize) -> ServerId {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&(index as u64 + 1).to_be_bytes());
    bytes[8] = 0x5e;
    ServerId::from_bytes(bytes)
}

fn vm_id(counter: u64) -> VmId {
    let mut bytes = [0u8; 16];
    bytes[8..].copy_from_slice(&counter.to_be_bytes());
    bytes[0] = 0x7f;
    VmId::from_bytes(bytes)
}

impl Grid {
    pub fn random(spec: &GridSpec, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let images: Vec<BaseImage> = (0..spec.images.max(1))
            .map(|index| BaseImage {
                id: ImageVersionId::new(format!("image-{index}"))
                    .expect("generated names are valid"),
                digest: Some(ImageDigest::from_bytes([index as u8; 32])),
                virtual_size: rng.random_range(2..=40) * GIB,
                parent: None,
                state: if rng.random_ratio(1, 20) {
                    ImageState::Importing
                } else {
                    ImageState::Ready
                },
            })
            .collect();
        let templates: Vec<Template> = (0..spec.templates.max(1))
            .map(|index| Template {
                name: TemplateName::new(format!("template-{index}"))
                    .expect("generated names are valid"),
                image: images[index % images.len()].id.clone(),
                vcpus: rng.random_range(1..=4),
                memory_mib: 1024 * rng.random_range(1..=8),
                desired_vms: rng.random_range(0..=spec.max_desired),
                min_idle_vms: rng.random_range(0..=3),
                min_replicas: rng.random_range(1..=3),
                concurrency_percent: if rng.random_ratio(1, 4) {
                    rng.random_range(10..=100)
                } else {
                    0
                },
                kind: if rng.random_ratio(1, 5) {
                    TemplateKind::Personal
                } else {
                    TemplateKind::Pooled
                },
                display: Default::default(),
                monitors: 1,
            })
            .collect();
        let entitled = templates
            .iter()
            .filter(|template| template.concurrency_percent > 0)
            .map(|template| (template.name.clone(), rng.random_range(0..=200)))
            .collect();
        let policy = Policy::default();
        let mut servers = Vec::with_capacity(spec.servers);
        for index in 0..spec.servers {
            let roll = rng.random_range(0..1000);
            let liveness = if roll < spec.missing_permille {
                Liveness::Missing
            } else if roll < spec.missing_permille + spec.suspect_permille {
                Liveness::Suspect
            } else {
                Liveness::Alive
            };
            let (cpus, memory_gib, disk_gib) = if spec.ample {
                (256, 4096, 100_000)
            } else {
                (
                    rng.random_range(4..=64),
                    rng.random_range(8..=512),
                    rng.random_range(20..=4000),
                )
            };
            let mut record = ServerRecord::new(
                format!("server-{index}"),
                vec![format!("10.0.{}.{}:7000", index / 250, index % 250 + 1)],
                SiteLabel::new(format!("site-{}", rng.random_range(0..spec.sites.max(1))))
                    .expect("generated names are valid"),
                0,
            );
            record.capacity = HostCapacity {
                cpus,
                memory_total_mib: memory_gib * 1024,
                memory_free_mib: memory_gib * 1024,
                storage_total_bytes: disk_gib * GIB,
                storage_free_bytes: disk_gib * GIB,
            };
            for image in &images {
                if rng.random_range(0..1000) < spec.holding_permille {
                    if record.capacity.storage_free_bytes < image.virtual_size {
                        continue;
                    }
                    record.capacity.storage_free_bytes -= image.virtual_size;
                    let holding = if rng.random_ratio(1, 8) {
                        ImageHolding::Partial {
                            bytes_done: image.virtual_size / 2,
                            bytes_total: image.virtual_size,
                        }
                    } else {
                        ImageHolding::Complete
                    };
                    record.images.insert(image.id.clone(), holding);
                }
            }
            servers.push((server_id(index), record, liveness));
        }
        let mut grid = Self {
            servers,
            templates,
            images,
            entitled,
            policy,
            next_vm: 0,
        };
        grid.scatter_vms(spec.vms, &mut rng);
        grid
    }

    /// Puts up to `count` VMs on servers that hold their image complete, within budgets.
    fn scatter_vms(&mut self, count: usize, rng: &mut StdRng) {
        if self.servers.is_empty() {
            return;
        }
        let states = [
            VmState::Ready,
            VmState::Ready,
            VmState::InUse,
            VmState::InUse,
            VmState::Reserved,
            VmState::Provisioning,
            VmState::Stopped,
            VmState::Failed,
            VmState::Refreshing,
        ];
        for _ in 0..count {
            let server = rng.random_range(0..self.servers.len());
            let template = &self.templates[rng.random_range(0..self.templates.len())];
            let (_, record, _) = &self.servers[server];
            if record.images.get(&template.image) != Some(&ImageHolding::Complete) {
                continue;
            }
            let (memory_budget, cpu_budget) = budgets(record, &self.policy);
            let (memory_used, cpu_used) = used(record);
            if memory_used + template.memory_mib > memory_budget
                || cpu_used + u64::from(template.vcpus) * 1000 > cpu_budget
            {
                continue;
            }
            let state = states[rng.random_range(0..states.len())];
            let user = matches!(state, VmState::InUse | VmState::Reserved).then(|| {
                UserName::new(format!("user-{}", rng.random_range(0..500)))
                    .expect("generated names are valid")
            });
            self.next_vm += 1;
            let id = vm_id(self.next_vm);
            let image = template.image.clone();
            let vm = VmRecord {
                id,
                template: template.name.clone(),
                image,
                state,
                user,
                vcpus: template.vcpus,
                memory_mib: template.memory_mib,
            };
            self.servers[server].1.vms.insert(id, vm);
        }
    }

    pub fn view(&self) -> GridView<'_> {
        GridView::new(
            self.servers
                .iter()
                .map(|(id, record, liveness)| ServerView {
                    id: *id,
                    liveness: *liveness,
                    record,
                }),
            &self.templates,
            &self.images,
            self.entitled.iter().map(|(name, users)| (name, *users)),
            self.policy.clone(),
        )
    }

    /// Every target carries out its steps (pulls complete at once; a
    /// server told to create VMs of an image it is still pulling finishes
    /// that pull first).
    pub fn apply(&mut self, plan: &Plan) {
        let index: BTreeMap<ServerId, usize> = self
            .servers
            .iter()
            .enumerate()
            .map(|(index, (id, ..))| (*id, index))
            .collect();
        let size_of = |images: &[BaseImage], id: &ImageVersionId| {
            images
                .iter()
                .find(|image| &image.id == id)
                .map_or(0, |image| image.virtual_size)
        };
        // Pulls, drops and removals first, creations last (they need the image).
        for step in &plan.steps {
            let record = &mut self.servers[index[&step.target]].1;
            match &step.action {
                Action::PullImage { image } => {
                    let size = size_of(&self.images, image);
                    let previous = record.images.insert(image.clone(), ImageHolding::Complete);
                    if previous.is_none() {
                        record.capacity.storage_free_bytes = record
                            .capacity
                            .storage_free_bytes
                            .checked_sub(size)
                            .expect("a pull never overfills a disk");
                    }
                }
                Action::DropImage { image } => {
                    if record.images.remove(image).is_some() {
                        record.capacity.storage_free_bytes += size_of(&self.images, image);
                    }
                }
                Action::RemoveVm { vm, .. } => {
                    assert!(record.vms.remove(vm).is_some(), "removed a VM that exists");
                }
                Action::RefreshVm { vm, .. } => {
                    let vm = record.vms.get_mut(vm).expect("refreshed a VM that exists");
                    assert_eq!(
                        vm.state,
                        VmState::Refreshing,
                        "refreshed a VM not refreshing"
                    );
                    vm.state = VmState::Ready;
                    vm.user = None;
                }
                Action::CreateVms { .. } => {}
            }
        }
        for step in &plan.steps {
            if let Action::CreateVms {
                template,
                image,
                count,
            } = &step.action
            {
                let template = self
                    .templates
                    .iter()
                    .find(|t| &t.name == template)
                    .expect("plans create VMs of known templates")
                    .clone();
                // A target still pulling the image waits for the pull, then
                // creates the VMs (what the policy loop does).
                let record = &mut self.servers[index[&step.target]].1;
                if let Some(holding @ ImageHolding::Partial { .. }) = record.images.get_mut(image) {
                    *holding = ImageHolding::Complete;
                }
                for _ in 0..*count {
                    self.next_vm += 1;
                    let id = vm_id(self.next_vm);
                    let record = &mut self.servers[index[&step.target]].1;
                    record.vms.insert(
                        id,
                        VmRecord {
                            id,
                            template: template.name.clone(),
                            image: image.clone(),
                            state: VmState::Ready,
                            user: None,
                            vcpus: template.vcpus,
                            memory_mib: template.memory_mib,
                        },
                    );
                }
            }
        }
    }

    /// Plans and applies until the plan is empty; returns the rounds taken
    /// (None when `limit` rounds were not enough).
    pub fn converge(&mut self, seed: u64, limit: usize) -> Option<usize> {
        for round in 0..limit {
            let plan = deskgrid::placement::plan(&self.view(), seed);
            if plan.is_empty() {
                return Some(round);
            }
            self.apply(&plan);
        }
        None
    }
}

/// (memory MiB, vCPU × 1000) budgets as the planner computes them.
pub fn budgets(record: &ServerRecord, policy: &Policy) -> (u64, u64) {
    let memory = (record.capacity.memory_total_mib * u64::from(policy.memory_overcommit_permille)
        / 1000)
        .saturating_sub(policy.host_reserved_memory_mib);
    let cpu = u64::from(record.capacity.cpus) * u64::from(policy.cpu_overcommit_permille);
    (memory, cpu)
}

/// (memory MiB, vCPU × 1000) taken by a server's VMs.
pub fn used(record: &ServerRecord) -> (u64, u64) {
    record.vms.values().fold((0, 0), |(memory, cpu), vm| {
        (memory + vm.memory_mib, cpu + u64::from(vm.vcpus) * 1000)
    })
}
