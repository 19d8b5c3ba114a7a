//! The `Hypervisor` contract, run against both implementations: the
//! in-memory fake and the libvirt one on libvirt's `test:///default` driver
//! (a real libvirt, in process, no QEMU). What the fake promises, libvirt
//! does too, so tests of the code above the actuator can trust the fake.
//!
//! `test:///default` keeps one host per process, shared by every connection:
//! reconnecting is how "the appliance restarted" looks here. Each test uses
//! its own pool so tests running in parallel do not see each other.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr as _;

use deskgrid::actuator::domain_xml::NetworkAttachment;
use deskgrid::actuator::fake::FakeHypervisor;
use deskgrid::actuator::libvirt::{LibvirtHypervisor, LibvirtOptions};
use deskgrid::actuator::{
    ActuatorError, DomainKind, DomainSpec, DomainState, Hypervisor, ShutdownOutcome, VolumeFormat,
    VolumeName,
};
use deskgrid::model::{ImageVersionId, Template, TemplateName, VmId};

const MIB: u64 = 1 << 20;

fn libvirt_on_test_driver(pool: &str) -> LibvirtHypervisor {
    LibvirtHypervisor::connect(LibvirtOptions {
        uri: "test:///default".to_owned(),
        pool: pool.to_owned(),
        pool_path: format!("/deskgrid-test/{pool}"),
        domain_kind: Some(DomainKind::Qemu),
        streams_only: false,
    })
    .unwrap()
}

fn template(name: &str, image: &ImageVersionId) -> Template {
    Template {
        name: TemplateName::new(name).unwrap(),
        image: image.clone(),
        vcpus: 2,
        memory_mib: 1024,
        desired_vms: 3,
        min_idle_vms: 1,
        min_replicas: 2,
        concurrency_percent: 0,
        kind: Default::default(),
        display: Default::default(),
        monitors: 2,
    }
}

/// Storage: pool, base volume, linked clones, and every refusal.
fn storage_contract(host: &dyn Hypervisor) {
    let pool = host.ensure_pool().unwrap();
    assert!(pool.available_bytes > 0);
    assert_eq!(
        host.ensure_pool().unwrap().name,
        pool.name,
        "ensure_pool is idempotent"
    );
    assert_eq!(host.list_volumes().unwrap(), vec![]);

    let image = ImageVersionId::new("office-2026.11").unwrap();
    let base = host
        .create_base_volume(&image, 16 * MIB, VolumeFormat::Raw)
        .unwrap();
    assert_eq!(base.name, VolumeName::Base(image.clone()));
    assert_eq!(base.capacity_bytes, 16 * MIB);
    assert!(matches!(
        host.create_base_volume(&image, 16 * MIB, VolumeFormat::Raw),
        Err(ActuatorError::VolumeExists { .. })
    ));

    let vms = [VmId::random(), VmId::random(), VmId::random()];
    for vm in vms {
        let clone = host.create_linked_clone(vm, &image).unwrap();
        assert_eq!(clone.name, VolumeName::Overlay(vm));
        assert_eq!(
            clone.capacity_bytes, base.capacity_bytes,
            "an overlay shows the base's size"
        );
    }
    let listed: Vec<VolumeName> = host
        .list_volumes()
        .unwrap()
        .into_iter()
        .map(|volume| volume.name)
        .collect();
    assert_eq!(listed.len(), 4);
    assert!(listed.contains(&VolumeName::Base(image.clone())));

    let missing = ImageVersionId::new("not-imported").unwrap();
    assert!(matches!(
        host.create_linked_clone(VmId::random(), &missing),
        Err(ActuatorError::VolumeNotFound { .. })
    ));
    let available = host.ensure_pool().unwrap().available_bytes;
    let error = host
        .create_base_volume(
            &ImageVersionId::new("huge").unwrap(),
            available + MIB,
            VolumeFormat::Raw,
        )
        .unwrap_err();
    assert!(matches!(error, ActuatorError::PoolFull { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains(&format!("{} are needed", available + MIB)),
        "{error}"
    );
    let error = host
        .read_volume_at(&VolumeName::Base(image.clone()), 16 * MIB - 2, 3)
        .unwrap_err();
    assert!(
        matches!(error, ActuatorError::OutOfBounds { .. }),
        "{error}"
    );
    let error = host
        .write_volume_at(&VolumeName::Base(image.clone()), 16 * MIB - 2, &[1, 2, 3])
        .unwrap_err();
    assert!(
        matches!(error, ActuatorError::OutOfBounds { .. }),
        "{error}"
    );

    for vm in vms {
        host.delete_volume(&VolumeName::Overlay(vm)).unwrap();
    }
    host.delete_volume(&VolumeName::Base(image.clone()))
        .unwrap();
    assert_eq!(host.list_volumes().unwrap(), vec![]);
    assert!(matches!(
        host.delete_volume(&VolumeName::Base(image)),
        Err(ActuatorError::VolumeNotFound { .. })
    ));
}

/// Domains: define, start, stop, undefine with the overlay, and adoption.
fn domain_contract(host: &dyn Hypervisor, reopen: &dyn Fn() -> Box<dyn Hypervisor>) {
    host.ensure_pool().unwrap();
    let image = ImageVersionId::new("base-1").unwrap();
    host.create_base_volume(&image, 8 * MIB, VolumeFormat::Qcow2)
        .unwrap();
    let template = template("office", &image);
    let vm = VmId::random();
    let overlay = host.create_linked_clone(vm, &image).unwrap();
    let spec = DomainSpec::for_template(
        &template,
        vm,
        DomainKind::Qemu,
        overlay.path.clone(),
        NetworkAttachment::None,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        "s3cret".to_owned(),
    );
    host.define_domain(&spec).unwrap();
    assert_eq!(host.domain_state(vm).unwrap(), DomainState::ShutOff);
    host.start_domain(vm).unwrap();
    assert_eq!(host.domain_state(vm).unwrap(), DomainState::Running);

    // The appliance restarts: a new connection finds its domain by metadata.
    let adopted = reopen().list_domains().unwrap();
    let found = adopted
        .iter()
        .find(|status| status.vm == vm)
        .expect("the VM is adopted");
    assert_eq!(found.template, template.name);
    assert_eq!(found.image, image);
    assert_eq!(found.state, DomainState::Running);

    let error = host.undefine_domain(vm).unwrap_err();
    assert!(error.to_string().contains("still running"), "{error}");
    host.destroy_domain(vm).unwrap();
    host.destroy_domain(vm).unwrap();
    assert_eq!(
        host.shutdown_domain(vm, std::time::Duration::from_secs(1))
            .unwrap(),
        ShutdownOutcome::AlreadyOff
    );
    assert!(matches!(
        host.set_display_ticket(vm, "pw", std::time::Duration::from_secs(30)),
        Err(ActuatorError::DomainNotRunning { .. })
    ));
    host.undefine_domain(vm).unwrap();
    assert!(matches!(
        host.domain_state(vm),
        Err(ActuatorError::DomainNotFound { .. })
    ));
    assert!(!host
        .list_domains()
        .unwrap()
        .iter()
        .any(|status| status.vm == vm));
    let remaining: Vec<VolumeName> = host
        .list_volumes()
        .unwrap()
        .into_iter()
        .map(|volume| volume.name)
        .collect();
    assert_eq!(
        remaining,
        vec![VolumeName::Base(image.clone())],
        "undefine removes the overlay"
    );
    host.delete_volume(&VolumeName::Base(image)).unwrap();
}

#[test]
fn fake_keeps_the_storage_contract() {
    storage_contract(&FakeHypervisor::new("deskgrid", 1 << 40, 8, 32 * 1024));
}

#[test]
fn libvirt_keeps_the_storage_contract() {
    storage_contract(&libvirt_on_test_driver("dg-contract-storage"));
}

#[test]
fn fake_keeps_the_domain_contract() {
    let fake = FakeHypervisor::new("deskgrid", 1 << 40, 8, 32 * 1024);
    let reopen_fake = fake.clone();
    domain_contract(&fake, &move || Box::new(reopen_fake.clone()));
}

#[test]
fn libvirt_keeps_the_domain_contract() {
    let pool = "dg-contract-domains";
    domain_contract(&libvirt_on_test_driver(pool), &|| {
        Box::new(libvirt_on_test_driver(pool))
    });
}

#[test]
fn volumes_deskgrid_did_not_create_are_never_listed() {
    let pool = "dg-contract-foreign";
    let host = libvirt_on_test_driver(pool);
    host.ensure_pool().unwrap();
    // Someone else's volume in the same pool, made behind deskgrid's back.
    let connection = virt::connect::Connect::open(Some("test:///default")).unwrap();
    let libvirt_pool = virt::storage_pool::StoragePool::lookup_by_name(&connection, pool).unwrap();
    virt::storage_vol::StorageVol::create_xml(
        &libvirt_pool,
        "<volume><name>debian12.qcow2</name><capacity>1048576</capacity></volume>",
        0,
    )
    .unwrap();
    assert_eq!(host.list_volumes().unwrap(), vec![]);

    let fake = FakeHypervisor::new("deskgrid", 1 << 30, 4, 8192);
    fake.ensure_pool().unwrap();
    fake.add_foreign_volume("debian12.qcow2", 1 << 20);
    assert_eq!(fake.list_volumes().unwrap(), vec![]);

    // And such a name cannot even be expressed as a volume deskgrid acts on.
    let error = VolumeName::from_str("debian12.qcow2").unwrap_err();
    assert!(error.to_string().contains("debian12.qcow2"), "{error}");
}

#[test]
fn bad_uri_and_missing_pool_are_clear_errors() {
    let error = LibvirtHypervisor::connect(LibvirtOptions {
        uri: "nosuchdriver:///system".to_owned(),
        pool: "deskgrid".to_owned(),
        pool_path: "/nowhere".to_owned(),
        domain_kind: None,
        streams_only: false,
    })
    .unwrap_err();
    assert!(matches!(error, ActuatorError::Connect { .. }), "{error}");
    assert!(
        error.to_string().contains("nosuchdriver:///system"),
        "{error}"
    );

    let host = libvirt_on_test_driver("dg-contract-never-created");
    let error = host.list_volumes().unwrap_err();
    assert!(
        error
            .to_string()
            .contains("dg-contract-never-created does not exist"),
        "{error}"
    );
    let fake = FakeHypervisor::new("deskgrid", 1 << 30, 4, 8192);
    let error = fake.list_volumes().unwrap_err();
    assert!(
        error.to_string().contains("deskgrid does not exist"),
        "{error}"
    );
}

#[test]
fn host_capacity_reports_cpus_memory_and_pool_space() {
    let host = libvirt_on_test_driver("dg-contract-capacity");
    host.ensure_pool().unwrap();
    let capacity = host.host_capacity().unwrap();
    assert!(capacity.cpus > 0);
    assert!(capacity.memory_total_mib > 0);
    assert!(capacity.storage_free_bytes <= capacity.storage_total_bytes);
    assert!(capacity.storage_total_bytes > 0);

    let fake = FakeHypervisor::new("deskgrid", 1 << 30, 4, 8192);
    fake.ensure_pool().unwrap();
    let capacity = fake.host_capacity().unwrap();
    assert_eq!(
        (
            capacity.cpus,
            capacity.memory_total_mib,
            capacity.storage_total_bytes
        ),
        (4, 8192, 1 << 30)
    );
}
