use super::*;

const VM_A: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 1];
const VM_B: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 2];

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&VM_B);
    frame.extend_from_slice(&VM_A);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn ipv4(protocol: u8, fragment: u16, l4: &[u8]) -> Vec<u8> {
    let mut header = vec![0x45, 0, 0, 0, 0, 0];
    header.extend_from_slice(&fragment.to_be_bytes());
    header.extend_from_slice(&[64, protocol, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    header.extend_from_slice(l4);
    header
}

fn ports(source: u16, destination: u16) -> Vec<u8> {
    let mut l4 = source.to_be_bytes().to_vec();
    l4.extend_from_slice(&destination.to_be_bytes());
    l4.extend_from_slice(&[0; 16]);
    l4
}

#[test]
fn a_tcp_frame_shows_macs_addresses_protocol_and_ports() {
    let frame = ethernet(ETH_P_IP, &ipv4(6, 0x4000, &ports(43210, 80)));
    let summary = summarize(&frame);
    assert_eq!(summary.source_mac, MacAddr(VM_A));
    assert_eq!(summary.destination_mac, MacAddr(VM_B));
    assert_eq!(summary.ethertype, ETH_P_IP);
    assert_eq!(
        summary.addresses,
        Some(("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()))
    );
    assert_eq!(summary.protocol, Some(6));
    assert_eq!(summary.ports, Some((43210, 80)));
    assert_eq!(summary.icmp, None);
}

#[test]
fn a_later_fragment_has_no_ports() {
    let frame = ethernet(ETH_P_IP, &ipv4(17, 0x00b9, &ports(53, 53)));
    let summary = summarize(&frame);
    assert_eq!(summary.protocol, Some(17));
    assert_eq!(summary.ports, None);
}

#[test]
fn icmp_shows_type_and_code() {
    let frame = ethernet(ETH_P_IP, &ipv4(1, 0, &[8, 0, 0, 0, 0, 1, 0, 1]));
    assert_eq!(summarize(&frame).icmp, Some((8, 0)));
}

#[test]
fn ipv6_walks_extension_headers_to_the_transport() {
    let mut packet = vec![0x60, 0, 0, 0, 0, 0, 0, 64];
    let source: Ipv6Addr = "fd00::1".parse().unwrap();
    let destination: Ipv6Addr = "fd00::2".parse().unwrap();
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    // Hop-by-hop options (next: UDP), 8 bytes.
    packet.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0, 0]);
    packet.extend_from_slice(&ports(546, 547));
    let frame = ethernet(ETH_P_IPV6, &packet);
    let summary = summarize(&frame);
    assert_eq!(summary.addresses, Some((source.into(), destination.into())));
    assert_eq!(summary.protocol, Some(17));
    assert_eq!(summary.ports, Some((546, 547)));
}

#[test]
fn arp_shows_operation_sender_and_target() {
    let mut packet = vec![0, 1, 8, 0, 6, 4, 0, 1];
    packet.extend_from_slice(&VM_A);
    packet.extend_from_slice(&[10, 0, 0, 1]);
    packet.extend_from_slice(&[0; 6]);
    packet.extend_from_slice(&[10, 0, 0, 9]);
    let summary = summarize(&ethernet(ETH_P_ARP, &packet));
    assert_eq!(summary.arp_operation, Some(1));
    assert_eq!(
        summary.addresses,
        Some(("10.0.0.1".parse().unwrap(), "10.0.0.9".parse().unwrap()))
    );
}

#[test]
fn a_vlan_tag_is_read_past() {
    let mut tagged = 0x0064u16.to_be_bytes().to_vec();
    tagged.extend_from_slice(&ETH_P_IP.to_be_bytes());
    tagged.extend_from_slice(&ipv4(17, 0, &ports(1000, 2000)));
    let summary = summarize(&ethernet(ETH_P_8021Q, &tagged));
    assert_eq!(summary.vlan, Some(100));
    assert_eq!(summary.ethertype, ETH_P_IP);
    assert_eq!(summary.ports, Some((1000, 2000)));
}

#[test]
fn a_cut_frame_shows_what_its_bytes_hold() {
    let frame = ethernet(ETH_P_IP, &ipv4(6, 0, &ports(1, 2)));
    // Ethernet and 10 bytes of IPv4: no addresses yet.
    let summary = summarize(&frame[..24]);
    assert_eq!(summary.ethertype, ETH_P_IP);
    assert_eq!(summary.addresses, None);
    assert_eq!(summarize(&frame[..5]), PacketSummary::default());
}

fn raw(kind: u32, hook: u32, reason: u32, frame: &[u8]) -> RawEvent {
    let mut event = RawEvent {
        timestamp_ns: 5_000_000_000,
        kind,
        hook,
        ifindex: 7,
        port_slot: 3,
        reason,
        original_len: 1500,
        captured_len: frame.len() as u32,
        ..RawEvent::default()
    };
    event.header[..frame.len()].copy_from_slice(frame);
    event
}

fn record(event: &RawEvent) -> Vec<u8> {
    // SAFETY: `RawEvent` is plain old data without padding.
    unsafe {
        std::slice::from_raw_parts(
            (event as *const RawEvent).cast::<u8>(),
            size_of::<RawEvent>(),
        )
    }
    .to_vec()
}

#[test]
fn a_drop_record_decodes_with_its_reason_port_time_and_bytes() {
    let frame = ethernet(ETH_P_IP, &ipv4(6, 0, &ports(1234, 80)));
    let bytes = record(&raw(
        monitor_kind::DROP,
        monitor_hook::FROM_PORT,
        DropReason::PolicyDenied as u32,
        &frame,
    ));
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let now = Clock {
        wall,
        monotonic_ns: 7_000_000_000,
    };
    let event = decode(&raw_event(&bytes).unwrap(), Some("p1".into()), now).unwrap();
    assert_eq!(event.verdict, Verdict::Dropped(DropReason::PolicyDenied));
    assert_eq!(event.hook, Hook::FromPort);
    assert_eq!(event.port_id.as_deref(), Some("p1"));
    assert_eq!(event.ifindex, 7);
    assert_eq!(event.original_length, 1500);
    assert_eq!(event.header, frame);
    assert_eq!(event.summary.ports, Some((1234, 80)));
    // Taken 2 s before `now`.
    assert_eq!(event.time, wall - Duration::from_secs(2));
}

#[test]
fn records_that_are_no_event_are_refused() {
    let now = Clock::now();
    assert_eq!(raw_event(&[0; 12]), Err(DecodeError::Size(12)));
    let unknown_reason = raw(monitor_kind::DROP, monitor_hook::TO_PORT, 999, &[]);
    assert_eq!(
        decode(&unknown_reason, None, now),
        Err(DecodeError::Reason(999))
    );
    let unknown_kind = raw(9, monitor_hook::TO_PORT, 0, &[]);
    assert_eq!(decode(&unknown_kind, None, now), Err(DecodeError::Kind(9)));
    let unknown_hook = raw(monitor_kind::TRACE, 0, 0, &[]);
    assert_eq!(decode(&unknown_hook, None, now), Err(DecodeError::Hook(0)));
    // A length past the header is held to it.
    let mut long = raw(monitor_kind::TRACE, monitor_hook::TO_PORT, 0, &[]);
    long.captured_len = 4096;
    assert_eq!(
        decode(&long, None, now).unwrap().header.len(),
        MONITOR_HEADER_BYTES
    );
}

fn event(port: &str, verdict: Verdict) -> PacketEvent {
    PacketEvent {
        time: SystemTime::UNIX_EPOCH,
        verdict,
        hook: Hook::ToPort,
        ifindex: 1,
        port_id: Some(port.into()),
        original_length: 60,
        header: Vec::new(),
        summary: PacketSummary::default(),
    }
}

#[test]
fn filters_select_port_traces_and_reasons() {
    let denied = event("p1", Verdict::Dropped(DropReason::PolicyDenied));
    let spoofed = event("p2", Verdict::Dropped(DropReason::SourceIpSpoofed));
    let delivered = event("p1", Verdict::Delivered);
    let drops = MonitorFilter::default();
    assert!(drops.matches(&denied) && drops.matches(&spoofed));
    assert!(!drops.matches(&delivered), "traces only when asked");
    let traced = MonitorFilter {
        trace: true,
        ..MonitorFilter::default()
    };
    assert!(traced.matches(&delivered));
    let port = MonitorFilter {
        port_id: Some("p1".into()),
        trace: true,
        ..MonitorFilter::default()
    };
    assert!(port.matches(&denied) && port.matches(&delivered));
    assert!(!port.matches(&spoofed));
    let reasons = MonitorFilter {
        reasons: vec![DropReason::SourceIpSpoofed],
        ..MonitorFilter::default()
    };
    assert!(reasons.matches(&spoofed) && !reasons.matches(&denied));
}

#[test]
fn emission_follows_the_subscribers() {
    assert_eq!(
        mode_for(0, 0),
        monitor_mode::OFF,
        "nobody listens: nothing emitted"
    );
    assert_eq!(mode_for(2, 0), monitor_mode::DROPS);
    assert_eq!(mode_for(2, 1), monitor_mode::TRACE);
}
