//! The static and dynamic balancers over one capacity ledger.
//!
//! One pass, in this order, each part seeing what the earlier parts decided:
//!
//! 1. **VMs that must go or start fresh**: failed VMs, idle VMs of a deleted
//!    template, idle VMs on an image version their template no longer uses;
//!    a pooled VM whose session ended is refreshed from its base image.
//! 2. **Surplus VMs**: a template with more VMs than it wants loses idle ones,
//!    from the most loaded server first.
//! 3. **Per image in use** (id order), static then dynamic: while fewer
//!    servers hold it than its templates' minimum replicas, the best-ranked
//!    eligible non-holder pulls it; then each template's deficit is dealt one
//!    VM at a time to the holder with the most room (complete holders before
//!    those still pulling), and when no holder has room the best-ranked
//!    non-holder is told to pull the image and takes VMs too.
//! 4. **Surplus copies**: holders beyond need plus the hysteresis margin drop
//!    the image, lowest-ranked first, never one that hosts a VM of it and
//!    never below the need in complete copies.
//!
//! Memory and CPU are budgets from the server's totals and the policy's
//! overcommit ratios, minus what its VMs (as recorded) take. Disk: a pull
//! needs the image's virtual size free. Everything is integer arithmetic.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use crate::model::{
    ImageHolding, ImageState, ImageVersionId, Name, Policy, ServerRecord, Template, TemplateName,
    VmRecord, VmState, DEFAULT_MIN_REPLICAS, MAX_DESIRED_VMS,
};

use super::rendezvous::{object_hash, score};
use super::view::saturating_u32;
use super::{Action, GridView, Plan, Reason, Shortfall, ShortfallCause, Step};

/// The plan for `view`: which servers pull or drop which image versions,
/// create or remove which VMs. Same view and seed, same plan.
pub fn plan(view: &GridView<'_>, seed: u64) -> Plan {
    Planner::new(view, seed).run()
}

/// The VMs a template wants: the admin's count, or the share of its entitled
/// users, whichever is larger, and at least enough that `min_idle_vms` stay
/// free beside the ones in use.
pub fn desired_vms(template: &Template, entitled_users: u32, in_use: u32) -> u32 {
    let by_users =
        (u64::from(entitled_users) * u64::from(template.concurrency_percent)).div_ceil(100);
    let base = u64::from(template.desired_vms).max(by_users);
    let with_headroom = base.max(u64::from(in_use) + u64::from(template.min_idle_vms));
    u32::try_from(with_headroom.min(MAX_DESIRED_VMS)).unwrap_or(u32::MAX)
}

/// Memory (MiB) and CPU (vCPU × 1000) a server may promise to VMs.
pub(crate) fn budgets(record: &ServerRecord, policy: &Policy) -> (i64, i64) {
    let capacity = &record.capacity;
    let memory = (i128::from(capacity.memory_total_mib)
        * i128::from(policy.memory_overcommit_permille)
        / 1000)
        - i128::from(policy.host_reserved_memory_mib);
    let cpu = i128::from(capacity.cpus) * i128::from(policy.cpu_overcommit_permille);
    (clamp_i64(memory.max(0)), clamp_i64(cpu))
}

fn clamp_i64(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// What a VM takes: its own recorded size, else its template's.
pub(crate) fn vm_size(vm: &VmRecord, template: Option<&Template>) -> (i64, i64) {
    let memory = if vm.memory_mib > 0 {
        vm.memory_mib
    } else {
        template.map_or(0, |template| template.memory_mib)
    };
    let vcpus = if vm.vcpus > 0 {
        vm.vcpus
    } else {
        template.map_or(0, |template| template.vcpus)
    };
    (clamp_i64(memory.into()), i64::from(vcpus) * 1000)
}

fn is_idle(state: VmState) -> bool {
    matches!(state, VmState::Ready | VmState::Stopped)
}

fn is_in_use(state: VmState) -> bool {
    matches!(state, VmState::Reserved | VmState::InUse)
}

/// One server's remaining room while the plan is built.
#[derive(Debug, Clone)]
struct Room {
    memory: i64,
    cpu: i64,
    /// Committed memory, for "most loaded first".
    committed: i64,
    budget: i64,
    disk: u128,
    images: u32,
}

impl Room {
    /// VMs of this size that still fit.
    fn fits(&self, memory: i64, cpu: i64) -> i64 {
        let by_memory = if memory > 0 {
            self.memory / memory
        } else {
            i64::MAX
        };
        let by_cpu = if cpu > 0 { self.cpu / cpu } else { i64::MAX };
        by_memory.min(by_cpu).max(0)
    }

    fn take(&mut self, memory: i64, cpu: i64) {
        self.memory -= memory;
        self.cpu -= cpu;
        self.committed += memory;
    }

    fn give(&mut self, memory: i64, cpu: i64) {
        self.memory += memory;
        self.cpu += cpu;
        self.committed -= memory;
    }

    /// Committed memory per million of budget (full or over: the maximum).
    fn load(&self) -> u64 {
        if self.budget <= 0 {
            return u64::MAX;
        }
        let load = i128::from(self.committed.max(0)) * 1_000_000 / i128::from(self.budget);
        u64::try_from(load).unwrap_or(u64::MAX)
    }
}

/// Where one server stands on one image during planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holding {
    Complete,
    Pulling,
}

struct Planner<'v, 'a> {
    view: &'v GridView<'a>,
    seed: u64,
    template_index: HashMap<&'a TemplateName, usize>,
    rooms: Vec<Room>,
    /// Per server index: image -> holding, including pulls planned here.
    holdings: Vec<BTreeMap<&'a ImageVersionId, Holding>>,
    /// Per template index: counted VMs by server index (current image only).
    allocated: Vec<BTreeMap<usize, u32>>,
    in_use: Vec<u32>,
    /// Per server index: idle VMs of each template index, lowest id first.
    idle: Vec<BTreeMap<usize, Vec<&'a VmRecord>>>,
    /// Per server index: VMs per image (any state, after removals), for
    /// "no VM uses this copy".
    image_users: Vec<BTreeMap<&'a ImageVersionId, u32>>,
    /// Planned VM creations: (server index, template index) -> count.
    creations: BTreeMap<(usize, usize), u32>,
    steps: Vec<Step>,
    shortfalls: Vec<Shortfall>,
}

impl<'v, 'a> Planner<'v, 'a> {
    fn new(view: &'v GridView<'a>, seed: u64) -> Self {
        let template_index: HashMap<&'a TemplateName, usize> = view
            .templates
            .iter()
            .enumerate()
            .map(|(index, template)| (&template.name, index))
            .collect();
        let servers = view.servers.len();
        let mut planner = Self {
            view,
            seed,
            template_index,
            rooms: Vec::with_capacity(servers),
            holdings: Vec::with_capacity(servers),
            allocated: vec![BTreeMap::new(); view.templates.len()],
            in_use: vec![0; view.templates.len()],
            idle: vec![BTreeMap::new(); servers],
            image_users: vec![BTreeMap::new(); servers],
            creations: BTreeMap::new(),
            steps: Vec::new(),
            shortfalls: Vec::new(),
        };
        planner.take_stock();
        planner
    }

    /// Builds the ledger from the records and plans the removals that follow
    /// from them alone (failed, orphaned, outdated VMs).
    fn take_stock(&mut self) {
        let view = self.view;
        for (server_index, server) in view.servers.iter().enumerate() {
            let record = server.record;
            let (memory, cpu) = budgets(record, &view.policy);
            let mut room = Room {
                memory,
                cpu,
                committed: 0,
                budget: memory,
                disk: u128::from(record.capacity.storage_free_bytes),
                images: saturating_u32(record.images.len()),
            };
            let holdings = record
                .images
                .iter()
                .map(|(image, holding)| {
                    let holding = match holding {
                        ImageHolding::Complete => Holding::Complete,
                        ImageHolding::Partial { .. } => Holding::Pulling,
                    };
                    (image, holding)
                })
                .collect();
            for vm in record.vms.values() {
                let template_index = self.template_index.get(&vm.template).copied();
                let template = template_index.map(|index| view.templates[index]);
                let (vm_memory, vm_cpu) = vm_size(vm, template);
                room.take(vm_memory, vm_cpu);
                if !server.counts() {
                    continue;
                }
                // A VM being refreshed after a pooled session is free
                // again as soon as it is: it goes like an idle one.
                let free = is_idle(vm.state) || vm.state == VmState::Refreshing;
                let removal = match template {
                    _ if vm.state == VmState::Failed => Some(Reason::FailedVm),
                    None if free => Some(Reason::TemplateDeleted),
                    Some(template) if vm.image != template.image && free => {
                        Some(Reason::OutdatedImage)
                    }
                    _ => None,
                };
                if let Some(reason) = removal {
                    if server.eligible() {
                        room.give(vm_memory, vm_cpu);
                        self.steps.push(Step {
                            target: server.id,
                            action: Action::RemoveVm {
                                vm: vm.id,
                                template: vm.template.clone(),
                            },
                            reason,
                        });
                        continue;
                    }
                }
                *self.image_users[server_index].entry(&vm.image).or_default() += 1;
                let Some(index) = template_index else {
                    continue;
                };
                if vm.state == VmState::Failed || vm.image != view.templates[index].image {
                    continue;
                }
                *self.allocated[index].entry(server_index).or_default() += 1;
                if is_in_use(vm.state) {
                    self.in_use[index] += 1;
                }
                if is_idle(vm.state) || vm.state == VmState::Refreshing {
                    self.idle[server_index].entry(index).or_default().push(vm);
                }
            }
            // Surplus goes refreshing VMs first (no point in refreshing a
            // VM only to remove it), then by id.
            for vms in self.idle[server_index].values_mut() {
                vms.sort_by_key(|vm| (vm.state != VmState::Refreshing, vm.id));
            }
            self.rooms.push(room);
            self.holdings.push(holdings);
        }
    }

    fn run(mut self) -> Plan {
        let view = self.view;
        let desired: Vec<u32> = view
            .templates
            .iter()
            .enumerate()
            .map(|(index, template)| {
                desired_vms(
                    template,
                    view.entitled_users(&template.name),
                    self.in_use[index],
                )
            })
            .collect();
        for (index, &want) in desired.iter().enumerate() {
            self.remove_surplus(index, want);
        }
        // Refreshing VMs that stay are refreshed for the next user.
        for (server, by_template) in self.idle.iter().enumerate() {
            if !view.servers[server].eligible() {
                continue;
            }
            for vm in by_template.values().flatten() {
                if vm.state == VmState::Refreshing {
                    self.steps.push(Step {
                        target: view.servers[server].id,
                        action: Action::RefreshVm {
                            vm: vm.id,
                            template: vm.template.clone(),
                        },
                        reason: Reason::SessionEnded,
                    });
                }
            }
        }
        let allocated_before: Vec<u32> = self
            .allocated
            .iter()
            .map(|servers| servers.values().sum())
            .collect();

        // Images in use: referenced by a template, or ready in the grid's library.
        let mut users_of: BTreeMap<&'a ImageVersionId, Vec<usize>> = BTreeMap::new();
        for (index, template) in view.templates.iter().enumerate() {
            users_of.entry(&template.image).or_default().push(index);
        }
        // A version superseded by one built from it (a difference disk) and
        // named by no template is on its way out: no library copies.
        let superseded: BTreeSet<&'a ImageVersionId> = view
            .images
            .values()
            .filter_map(|image| image.parent.as_ref())
            .filter(|parent| !users_of.contains_key(parent))
            .collect();
        for (id, image) in &view.images {
            if image.state == ImageState::Ready && !superseded.contains(id) {
                users_of.entry(id).or_default();
            }
        }
        let mut needs: BTreeMap<&'a ImageVersionId, u32> = BTreeMap::new();
        for (&image, templates) in &users_of {
            let need = self.place_image(image, templates, &desired);
            needs.insert(image, need);
        }
        self.drop_surplus_copies(&needs);

        for (&(server_index, template_index), &count) in &self.creations {
            let template = view.templates[template_index];
            self.steps.push(Step {
                target: view.servers[server_index].id,
                action: Action::CreateVms {
                    template: template.name.clone(),
                    image: template.image.clone(),
                    count,
                },
                reason: Reason::Deficit {
                    desired: desired[template_index],
                    allocated: allocated_before[template_index],
                },
            });
        }
        self.steps.sort();
        self.shortfalls.sort();
        Plan {
            steps: self.steps,
            shortfalls: self.shortfalls,
        }
    }

    /// Removes idle VMs beyond `desired`, most loaded server first.
    fn remove_surplus(&mut self, index: usize, desired: u32) {
        let allocated: u32 = self.allocated[index].values().sum();
        if allocated <= desired {
            return;
        }
        let template = self.view.templates[index];
        let object = object_hash(self.seed, template.name.as_str().as_bytes());
        let mut heap: BinaryHeap<(u64, Reverse<u64>, usize)> = self.allocated[index]
            .keys()
            .filter(|&&server| self.view.servers[server].eligible())
            .filter(|&&server| {
                self.idle[server]
                    .get(&index)
                    .is_some_and(|vms| !vms.is_empty())
            })
            .map(|&server| {
                (
                    self.rooms[server].load(),
                    Reverse(score(object, self.view.servers[server].id)),
                    server,
                )
            })
            .collect();
        let mut surplus = allocated - desired;
        while surplus > 0 {
            let Some((_, tie, server)) = heap.pop() else {
                break;
            };
            let Some(vm) = self.idle[server].get_mut(&index).and_then(|vms| {
                if vms.is_empty() {
                    None
                } else {
                    Some(vms.remove(0))
                }
            }) else {
                continue;
            };
            let (memory, cpu) = vm_size(vm, Some(template));
            self.rooms[server].give(memory, cpu);
            if let Some(count) = self.allocated[index].get_mut(&server) {
                *count -= 1;
            }
            if let Some(count) = self.image_users[server].get_mut(&vm.image) {
                *count -= 1;
            }
            self.steps.push(Step {
                target: self.view.servers[server].id,
                action: Action::RemoveVm {
                    vm: vm.id,
                    template: template.name.clone(),
                },
                reason: Reason::Surplus { desired, allocated },
            });
            surplus -= 1;
            if self.idle[server]
                .get(&index)
                .is_some_and(|vms| !vms.is_empty())
            {
                heap.push((self.rooms[server].load(), tie, server));
            }
        }
    }

    /// Static then dynamic placement of one image; returns the number of
    /// holders it needs (for dropping surplus copies).
    fn place_image(
        &mut self,
        image: &'a ImageVersionId,
        templates: &[usize],
        desired: &[u32],
    ) -> u32 {
        let view = self.view;
        let counting = view.servers.iter().filter(|server| server.counts()).count();
        // A retired version still serves the templates that name it.
        let ready = view
            .image(image)
            .is_some_and(|image| image.state != ImageState::Importing);
        let deficit = |planner: &Self, index: usize| {
            let allocated: u32 = planner.allocated[index].values().sum();
            desired[index].saturating_sub(allocated)
        };
        if !ready {
            for &index in templates {
                let missing = deficit(self, index);
                if missing > 0 {
                    self.shortfall(index, missing, ShortfallCause::ImageNotReady);
                }
            }
            // Not placeable yet: whoever holds it keeps it.
            return u32::MAX;
        }
        let min_replicas = templates
            .iter()
            .map(|&index| view.templates[index].min_replicas)
            .max()
            .unwrap_or(DEFAULT_MIN_REPLICAS);
        let need = min_replicas.min(saturating_u32(counting));
        let has_source = view.servers.iter().enumerate().any(|(index, server)| {
            server.counts() && self.holdings[index].get(image) == Some(&Holding::Complete)
        });
        let size = u128::from(view.image(image).map_or(0, |image| image.virtual_size));
        let object = object_hash(self.seed, image.as_str().as_bytes());
        let mut candidates: Option<Vec<usize>> = None;

        // Static: minimum replicas.
        let mut holders = self.holders(image);
        while has_source && holders < need {
            let Some(server) = self.next_candidate(&mut candidates, image, object, size, None)
            else {
                break;
            };
            self.start_pull(
                server,
                image,
                size,
                Reason::BelowMinReplicas { holders, need },
            );
            holders += 1;
        }

        // Dynamic: deal each template's deficit; static again when no holder has room.
        for &index in templates {
            let template = view.templates[index];
            let mut missing = deficit(self, index);
            if missing == 0 {
                continue;
            }
            let (memory, cpu) = (
                clamp_i64(template.memory_mib.into()),
                i64::from(template.vcpus) * 1000,
            );
            let tie = object_hash(self.seed, template.name.as_str().as_bytes());
            // (complete first, most VMs still fitting, rendezvous) -> server
            let mut heap: BinaryHeap<(bool, i64, u64, usize)> = BinaryHeap::new();
            // Without a complete copy anywhere, no pull can finish: nothing
            // is dealt (a shortfall says why).
            let holdings = if has_source { &self.holdings[..] } else { &[] };
            for (server, holdings) in holdings.iter().enumerate() {
                let Some(holding) = holdings.get(image) else {
                    continue;
                };
                let fits = self.rooms[server].fits(memory, cpu);
                if view.servers[server].eligible() && fits > 0 {
                    heap.push((
                        *holding == Holding::Complete,
                        fits,
                        score(tie, view.servers[server].id),
                        server,
                    ));
                }
            }
            while missing > 0 {
                let server = match heap.pop() {
                    Some((_, _, _, server)) => server,
                    None => {
                        if !has_source {
                            break;
                        }
                        let Some(server) = self.next_candidate(
                            &mut candidates,
                            image,
                            object,
                            size,
                            Some((memory, cpu)),
                        ) else {
                            break;
                        };
                        self.start_pull(
                            server,
                            image,
                            size,
                            Reason::RoomForVms {
                                template: template.name.clone(),
                                unplaced: missing,
                            },
                        );
                        server
                    }
                };
                self.rooms[server].take(memory, cpu);
                *self.creations.entry((server, index)).or_default() += 1;
                *self.allocated[index].entry(server).or_default() += 1;
                *self.image_users[server].entry(image).or_default() += 1;
                missing -= 1;
                let fits = self.rooms[server].fits(memory, cpu);
                if fits > 0 {
                    let complete = self.holdings[server].get(image) == Some(&Holding::Complete);
                    heap.push((complete, fits, score(tie, view.servers[server].id), server));
                }
            }
            if missing > 0 {
                let cause = if has_source {
                    ShortfallCause::NoCapacity
                } else {
                    ShortfallCause::ImageUnavailable
                };
                self.shortfall(index, missing, cause);
            }
        }
        let hosting = (0..view.servers.len())
            .filter(|&server| {
                view.servers[server].counts()
                    && self.holdings[server].contains_key(image)
                    && self.image_users[server].get(image).copied().unwrap_or(0) > 0
            })
            .count();
        need.max(saturating_u32(hosting))
    }

    /// Servers that count and hold (or pull) `image`.
    fn holders(&self, image: &ImageVersionId) -> u32 {
        saturating_u32(
            self.view
                .servers
                .iter()
                .zip(&self.holdings)
                .filter(|(server, holdings)| server.counts() && holdings.contains_key(image))
                .count(),
        )
    }

    /// The best-ranked eligible server that does not hold `image`, has disk
    /// for it and (when `vm` is given) room for one such VM. Candidates are
    /// ranked once per image: most free memory, holding the version it was
    /// built from, same site as a complete holder, fewest images, rendezvous
    /// hash.
    fn next_candidate(
        &self,
        candidates: &mut Option<Vec<usize>>,
        image: &ImageVersionId,
        object: u64,
        size: u128,
        vm: Option<(i64, i64)>,
    ) -> Option<usize> {
        let view = self.view;
        let ranked = candidates.get_or_insert_with(|| {
            let holder_sites: Vec<_> = view
                .servers
                .iter()
                .zip(&self.holdings)
                .filter(|(server, holdings)| {
                    server.counts() && holdings.get(image) == Some(&Holding::Complete)
                })
                .map(|(server, _)| &server.record.site)
                .collect();
            let mut ranked: Vec<usize> = (0..view.servers.len())
                .filter(|&server| view.servers[server].eligible())
                .filter(|&server| !self.holdings[server].contains_key(image))
                .collect();
            // A server holding the version this one was built from gets it
            // as a small difference disk: the cheapest transfer of all.
            let parent = view.image(image).and_then(|image| image.parent.as_ref());
            ranked.sort_by_cached_key(|&server| {
                let room = &self.rooms[server];
                let same_site = holder_sites.contains(&&view.servers[server].record.site);
                let holds_parent = parent.is_some_and(|parent| {
                    self.holdings[server].get(parent) == Some(&Holding::Complete)
                });
                (
                    Reverse(room.memory),
                    Reverse(holds_parent),
                    Reverse(same_site),
                    room.images,
                    Reverse(score(object, view.servers[server].id)),
                )
            });
            ranked.reverse();
            ranked
        });
        // `ranked` is kept best-last so that taking one is a pop.
        while let Some(&server) = ranked.last() {
            if self.holdings[server].contains_key(image) {
                ranked.pop();
                continue;
            }
            let room = &self.rooms[server];
            let fits = vm.is_none_or(|(memory, cpu)| room.fits(memory, cpu) > 0);
            if room.disk >= size && fits {
                ranked.pop();
                return Some(server);
            }
            ranked.pop();
        }
        None
    }

    fn start_pull(&mut self, server: usize, image: &'a ImageVersionId, size: u128, reason: Reason) {
        self.holdings[server].insert(image, Holding::Pulling);
        let room = &mut self.rooms[server];
        room.disk -= size;
        room.images += 1;
        self.steps.push(Step {
            target: self.view.servers[server].id,
            action: Action::PullImage {
                image: image.clone(),
            },
            reason,
        });
    }

    /// Drops copies nobody needs: of images out of use everywhere they host
    /// no VM, of images in use beyond need plus the hysteresis margin.
    fn drop_surplus_copies(&mut self, needs: &BTreeMap<&'a ImageVersionId, u32>) {
        let view = self.view;
        let hysteresis = view.policy.replica_hysteresis;
        let mut held: BTreeMap<&'a ImageVersionId, Vec<usize>> = BTreeMap::new();
        for (server, holdings) in self.holdings.iter().enumerate() {
            if !view.servers[server].counts() {
                continue;
            }
            for &image in holdings.keys() {
                held.entry(image).or_default().push(server);
            }
        }
        for (image, holders) in held {
            let hosting =
                |server: usize| self.image_users[server].get(image).copied().unwrap_or(0) > 0;
            let object = object_hash(self.seed, image.as_str().as_bytes());
            let mut droppable: Vec<usize> = holders
                .iter()
                .copied()
                .filter(|&server| view.servers[server].eligible() && !hosting(server))
                .collect();
            let Some(&need) = needs.get(image) else {
                // A superseded parent stays until each version built from
                // it has its copies complete: until then servers rebuild
                // those from the parent and a small difference disk.
                if self.children_still_placing(image, needs) {
                    continue;
                }
                for server in droppable {
                    self.drop_copy(server, image, Reason::UnusedImage);
                }
                continue;
            };
            let count = saturating_u32(holders.len());
            let keep = need.saturating_add(hysteresis);
            if count <= keep {
                continue;
            }
            // Lowest-ranked first: pulls before complete copies, then least
            // free memory, then most images, then the rendezvous hash.
            droppable.sort_by_cached_key(|&server| {
                let room = &self.rooms[server];
                (
                    self.holdings[server].get(image) == Some(&Holding::Complete),
                    room.memory,
                    Reverse(room.images),
                    score(object, view.servers[server].id),
                )
            });
            let mut complete = holders
                .iter()
                .filter(|&&server| self.holdings[server].get(image) == Some(&Holding::Complete))
                .count();
            let mut remaining = count;
            for server in droppable {
                if remaining <= keep {
                    break;
                }
                let is_complete = self.holdings[server].get(image) == Some(&Holding::Complete);
                if is_complete && saturating_u32(complete) <= need {
                    continue;
                }
                if is_complete {
                    complete -= 1;
                }
                remaining -= 1;
                self.drop_copy(
                    server,
                    image,
                    Reason::SurplusCopy {
                        holders: count,
                        keep,
                    },
                );
            }
        }
    }

    /// Whether some version whose parent is `image` has fewer complete
    /// copies (on servers that count) than it needs.
    fn children_still_placing(
        &self,
        image: &ImageVersionId,
        needs: &BTreeMap<&'a ImageVersionId, u32>,
    ) -> bool {
        let view = self.view;
        view.images
            .values()
            .filter(|child| child.parent.as_ref() == Some(image))
            .any(|child| {
                let need = needs.get(&child.id).copied().unwrap_or(0);
                let complete = self
                    .holdings
                    .iter()
                    .zip(&view.servers)
                    .filter(|(holdings, server)| {
                        server.counts() && holdings.get(&child.id) == Some(&Holding::Complete)
                    })
                    .count();
                saturating_u32(complete) < need.min(saturating_u32(view.servers.len()))
            })
    }

    fn drop_copy(&mut self, server: usize, image: &'a ImageVersionId, reason: Reason) {
        self.holdings[server].remove(image);
        self.steps.push(Step {
            target: self.view.servers[server].id,
            action: Action::DropImage {
                image: image.clone(),
            },
            reason,
        });
    }

    fn shortfall(&mut self, index: usize, missing_vms: u32, cause: ShortfallCause) {
        self.shortfalls.push(Shortfall {
            template: self.view.templates[index].name.clone(),
            missing_vms,
            cause,
        });
    }
}
