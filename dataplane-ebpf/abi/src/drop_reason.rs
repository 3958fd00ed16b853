/// Why a packet was dropped. The one list of reasons: the programs count drops by it,
/// the agent reports them, and `proto/dataplane.proto`'s `DropReason` mirrors it value
/// for value (a test in the agent holds the two together). Append only: a value never
/// changes meaning.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Shorter than an Ethernet header, or a multicast source MAC.
    MalformedEthernet = 1,
    /// ARP that is not Ethernet/IPv4 or is truncated.
    MalformedArp = 2,
    /// Truncated IPv4 header, bad version, IHL or total length.
    MalformedIpv4 = 3,
    /// Truncated IPv6 header, bad version, payload length or extension header chain.
    MalformedIpv6 = 4,
    /// Truncated transport header (UDP, ICMP, ICMPv6) where a check needs it.
    MalformedL4 = 5,
    /// The device has no port on this node.
    UnknownPort = 6,
    /// The port or its network has `admin_state_up = false`.
    PortAdminDown = 7,
    /// Source MAC is neither the port's nor an allowed address pair's.
    SourceMacSpoofed = 8,
    /// Source IP is not a fixed IP or allowed address pair of the port (for that MAC).
    SourceIpSpoofed = 9,
    /// ARP sender MAC/IP is not the port's.
    ArpSpoofed = 10,
    /// Neighbour solicitation/advertisement claiming an address or MAC not the port's.
    NdSpoofed = 11,
    /// An IPv6 router advertisement from a VM port.
    RouterAdvertisementFromPort = 12,
    /// A DHCP (v4 or v6) server reply from a VM port.
    DhcpServerFromPort = 13,
    /// An ethertype port security does not allow (not ARP, IPv4 or IPv6; VLAN tags too).
    EthertypeNotAllowed = 14,
    /// Unicast to a MAC that no other port of the network owns or accepts.
    UnknownDestination = 15,
    /// A frame the host's own stack sent to a port device: not part of any network.
    NotFromDatapath = 16,
    /// The kernel refused to redirect or clone the frame.
    RedirectFailed = 17,
    /// Broadcast or multicast with no other port of the network on this node to go to.
    NoFloodTarget = 18,
    /// No security-group rule of the port allows the packet.
    PolicyDenied = 19,
    /// A tracked connection the current rules no longer allow: cut at its next packet.
    ConnectionRevoked = 20,
    /// A packet no connection can be in: TCP with impossible flags, an ICMP error
    /// about no tracked connection and allowed by no rule.
    CtInvalid = 21,
    /// A new connection while the conntrack table is full.
    CtTableFull = 22,
    /// Routed, but the router has no route to the destination.
    NoRoute = 23,
    /// Routed, but the next hop's MAC is not known (no port has that address).
    NoNeighbor = 24,
    /// Routed with a TTL (hop limit) of 1 or less.
    TtlExceeded = 25,
    /// SNAT found no free port of the gateway's range towards that remote endpoint.
    NatPortsExhausted = 26,
    /// Arrived on the uplink for an external address with no translation for it: an
    /// unassociated floating IP, or no SNAT binding for that connection.
    NoNatBinding = 27,
    /// SNAT cannot translate it: a fragment after the first, or a protocol without
    /// ports or echo identifiers.
    NatUnsupported = 28,
    /// The hook found no program of the active map set to hand the frame to (the agent
    /// never left one out), or the active set changed twice while it looked.
    StageUnavailable = 29,
}

impl DropReason {
    /// Length of per-reason counter arrays; reason values are indexes into them.
    pub const COUNT: usize = 32;

    /// Every reason, in value order.
    pub const ALL: [DropReason; 29] = [
        DropReason::MalformedEthernet,
        DropReason::MalformedArp,
        DropReason::MalformedIpv4,
        DropReason::MalformedIpv6,
        DropReason::MalformedL4,
        DropReason::UnknownPort,
        DropReason::PortAdminDown,
        DropReason::SourceMacSpoofed,
        DropReason::SourceIpSpoofed,
        DropReason::ArpSpoofed,
        DropReason::NdSpoofed,
        DropReason::RouterAdvertisementFromPort,
        DropReason::DhcpServerFromPort,
        DropReason::EthertypeNotAllowed,
        DropReason::UnknownDestination,
        DropReason::NotFromDatapath,
        DropReason::RedirectFailed,
        DropReason::NoFloodTarget,
        DropReason::PolicyDenied,
        DropReason::ConnectionRevoked,
        DropReason::CtInvalid,
        DropReason::CtTableFull,
        DropReason::NoRoute,
        DropReason::NoNeighbor,
        DropReason::TtlExceeded,
        DropReason::NatPortsExhausted,
        DropReason::NoNatBinding,
        DropReason::NatUnsupported,
        DropReason::StageUnavailable,
    ];

    pub const fn from_u32(value: u32) -> Option<DropReason> {
        if value == 0 || value as usize > Self::ALL.len() {
            return None;
        }
        Some(Self::ALL[value as usize - 1])
    }

    /// Stable snake_case name, used in metrics, logs and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::MalformedEthernet => "malformed_ethernet",
            DropReason::MalformedArp => "malformed_arp",
            DropReason::MalformedIpv4 => "malformed_ipv4",
            DropReason::MalformedIpv6 => "malformed_ipv6",
            DropReason::MalformedL4 => "malformed_l4",
            DropReason::UnknownPort => "unknown_port",
            DropReason::PortAdminDown => "port_admin_down",
            DropReason::SourceMacSpoofed => "source_mac_spoofed",
            DropReason::SourceIpSpoofed => "source_ip_spoofed",
            DropReason::ArpSpoofed => "arp_spoofed",
            DropReason::NdSpoofed => "nd_spoofed",
            DropReason::RouterAdvertisementFromPort => "router_advertisement_from_port",
            DropReason::DhcpServerFromPort => "dhcp_server_from_port",
            DropReason::EthertypeNotAllowed => "ethertype_not_allowed",
            DropReason::UnknownDestination => "unknown_destination",
            DropReason::NotFromDatapath => "not_from_datapath",
            DropReason::RedirectFailed => "redirect_failed",
            DropReason::NoFloodTarget => "no_flood_target",
            DropReason::PolicyDenied => "policy_denied",
            DropReason::ConnectionRevoked => "connection_revoked",
            DropReason::CtInvalid => "ct_invalid",
            DropReason::CtTableFull => "ct_table_full",
            DropReason::NoRoute => "no_route",
            DropReason::NoNeighbor => "no_neighbor",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::NatPortsExhausted => "nat_ports_exhausted",
            DropReason::NoNatBinding => "no_nat_binding",
            DropReason::NatUnsupported => "nat_unsupported",
            DropReason::StageUnavailable => "stage_unavailable",
        }
    }
}

// Every value indexes the counter arrays, and `ALL` is in value order without gaps.
const _: () = {
    assert!(DropReason::ALL.len() < DropReason::COUNT);
    let mut i = 0;
    while i < DropReason::ALL.len() {
        assert!(DropReason::ALL[i] as usize == i + 1);
        i += 1;
    }
};
