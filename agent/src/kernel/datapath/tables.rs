//! Writing a compiled [`DatapathTables`] into one map set: by difference from what it
//! holds, or, when that is not known, by comparing with what the maps actually hold.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    HashMap, MapData, MapError,
};
use dataplane_abi::map_names;
use tracing::warn;

use super::{DatapathError, SetMaps};
use crate::core::compile::DatapathTables;

/// Every map the agent writes from `DatapathTables`, once: `$each!(field, NAME, kind)`
/// for each, the kind saying how the table is kept (`hash` and `trie` maps, `set` and
/// `trie_set` key sets written with value 1). The per-CPU counters, conntrack and SNAT
/// maps are the programs' own.
macro_rules! written_maps {
    ($each:ident) => {
        [
            $each!(ports, PORTS, hash),
            $each!(port_macs, PORT_MACS, set),
            $each!(port_ip4, PORT_IP4, set),
            $each!(port_net4, PORT_NET4, trie_set),
            $each!(port_ip6, PORT_IP6, set),
            $each!(port_net6, PORT_NET6, trie_set),
            $each!(fdb, FDB, hash),
            $each!(flood, FLOOD, hash),
            $each!(sg_remote4, SG_REMOTE4, trie),
            $each!(sg_remote6, SG_REMOTE6, trie),
            $each!(sg_rules, SG_RULES, trie),
            $each!(router_ifs, ROUTER_IFS, hash),
            $each!(routes4, ROUTES4, trie),
            $each!(routes6, ROUTES6, trie),
            $each!(neigh4, NEIGH4, hash),
            $each!(neigh6, NEIGH6, hash),
            $each!(router_gw, ROUTER_GW, hash),
            $each!(router_gw6, ROUTER_GW6, hash),
            $each!(gateway_macs, GATEWAY_MACS, hash),
            $each!(ext_addrs4, EXT_ADDRS4, hash),
            $each!(ext_addrs6, EXT_ADDRS6, hash),
            $each!(fips4, FIPS4, hash),
            $each!(fip_of4, FIP_OF4, hash),
        ]
    };
}
pub(super) use written_maps;

impl SetMaps {
    /// Makes the maps hold `new` instead of `old` by writing only the difference, in an
    /// order that never lets a packet see a port before its address and forwarding
    /// entries exist, nor forwarding entries outlive their port. The order matters only
    /// for the active set (drift repair); the inactive set is not read while written.
    pub fn write(&mut self, old: &DatapathTables, new: &DatapathTables) -> MapResult {
        let m = self;
        // Rules before the address classes that lead to them, both before the ports.
        upsert_trie_map(
            &mut m.sg_rules,
            &old.sg_rules,
            &new.sg_rules,
            map_names::SG_RULES,
        )?;
        upsert_trie_map(
            &mut m.sg_remote4,
            &old.sg_remote4,
            &new.sg_remote4,
            map_names::SG_REMOTE4,
        )?;
        upsert_trie_map(
            &mut m.sg_remote6,
            &old.sg_remote6,
            &new.sg_remote6,
            map_names::SG_REMOTE6,
        )?;
        upsert_set(
            &mut m.port_macs,
            &old.port_macs,
            &new.port_macs,
            map_names::PORT_MACS,
        )?;
        upsert_set(
            &mut m.port_ip4,
            &old.port_ip4,
            &new.port_ip4,
            map_names::PORT_IP4,
        )?;
        upsert_set(
            &mut m.port_ip6,
            &old.port_ip6,
            &new.port_ip6,
            map_names::PORT_IP6,
        )?;
        upsert_trie(
            &mut m.port_net4,
            &old.port_net4,
            &new.port_net4,
            map_names::PORT_NET4,
        )?;
        upsert_trie(
            &mut m.port_net6,
            &old.port_net6,
            &new.port_net6,
            map_names::PORT_NET6,
        )?;
        upsert_map(&mut m.fdb, &old.fdb, &new.fdb, map_names::FDB)?;
        upsert_map(&mut m.flood, &old.flood, &new.flood, map_names::FLOOD)?;
        // Routes and neighbours before the interfaces that lead to them; translations
        // before the external routes and addresses that lead to them.
        upsert_map(&mut m.neigh4, &old.neigh4, &new.neigh4, map_names::NEIGH4)?;
        upsert_map(&mut m.neigh6, &old.neigh6, &new.neigh6, map_names::NEIGH6)?;
        upsert_map(&mut m.fips4, &old.fips4, &new.fips4, map_names::FIPS4)?;
        upsert_map(
            &mut m.fip_of4,
            &old.fip_of4,
            &new.fip_of4,
            map_names::FIP_OF4,
        )?;
        upsert_map(
            &mut m.router_gw,
            &old.router_gw,
            &new.router_gw,
            map_names::ROUTER_GW,
        )?;
        upsert_map(
            &mut m.ext_addrs4,
            &old.ext_addrs4,
            &new.ext_addrs4,
            map_names::EXT_ADDRS4,
        )?;
        upsert_map(
            &mut m.router_gw6,
            &old.router_gw6,
            &new.router_gw6,
            map_names::ROUTER_GW6,
        )?;
        upsert_map(
            &mut m.ext_addrs6,
            &old.ext_addrs6,
            &new.ext_addrs6,
            map_names::EXT_ADDRS6,
        )?;
        upsert_trie_map(
            &mut m.routes4,
            &old.routes4,
            &new.routes4,
            map_names::ROUTES4,
        )?;
        upsert_trie_map(
            &mut m.routes6,
            &old.routes6,
            &new.routes6,
            map_names::ROUTES6,
        )?;
        upsert_map(
            &mut m.router_ifs,
            &old.router_ifs,
            &new.router_ifs,
            map_names::ROUTER_IFS,
        )?;
        upsert_map(
            &mut m.gateway_macs,
            &old.gateway_macs,
            &new.gateway_macs,
            map_names::GATEWAY_MACS,
        )?;
        upsert_map(&mut m.ports, &old.ports, &new.ports, map_names::PORTS)?;

        // (While the set is active, the port is what turns a device's frames on.)
        remove_map(&mut m.ports, &old.ports, &new.ports, map_names::PORTS)?;
        remove_map(
            &mut m.gateway_macs,
            &old.gateway_macs,
            &new.gateway_macs,
            map_names::GATEWAY_MACS,
        )?;
        remove_map(
            &mut m.router_ifs,
            &old.router_ifs,
            &new.router_ifs,
            map_names::ROUTER_IFS,
        )?;
        remove_trie_map(
            &mut m.routes6,
            &old.routes6,
            &new.routes6,
            map_names::ROUTES6,
        )?;
        remove_trie_map(
            &mut m.routes4,
            &old.routes4,
            &new.routes4,
            map_names::ROUTES4,
        )?;
        remove_map(
            &mut m.ext_addrs6,
            &old.ext_addrs6,
            &new.ext_addrs6,
            map_names::EXT_ADDRS6,
        )?;
        remove_map(
            &mut m.router_gw6,
            &old.router_gw6,
            &new.router_gw6,
            map_names::ROUTER_GW6,
        )?;
        remove_map(
            &mut m.ext_addrs4,
            &old.ext_addrs4,
            &new.ext_addrs4,
            map_names::EXT_ADDRS4,
        )?;
        remove_map(
            &mut m.router_gw,
            &old.router_gw,
            &new.router_gw,
            map_names::ROUTER_GW,
        )?;
        remove_map(
            &mut m.fip_of4,
            &old.fip_of4,
            &new.fip_of4,
            map_names::FIP_OF4,
        )?;
        remove_map(&mut m.fips4, &old.fips4, &new.fips4, map_names::FIPS4)?;
        remove_map(&mut m.neigh6, &old.neigh6, &new.neigh6, map_names::NEIGH6)?;
        remove_map(&mut m.neigh4, &old.neigh4, &new.neigh4, map_names::NEIGH4)?;
        remove_map(&mut m.flood, &old.flood, &new.flood, map_names::FLOOD)?;
        remove_map(&mut m.fdb, &old.fdb, &new.fdb, map_names::FDB)?;
        remove_trie(
            &mut m.port_net6,
            &old.port_net6,
            &new.port_net6,
            map_names::PORT_NET6,
        )?;
        remove_trie(
            &mut m.port_net4,
            &old.port_net4,
            &new.port_net4,
            map_names::PORT_NET4,
        )?;
        remove_set(
            &mut m.port_ip6,
            &old.port_ip6,
            &new.port_ip6,
            map_names::PORT_IP6,
        )?;
        remove_set(
            &mut m.port_ip4,
            &old.port_ip4,
            &new.port_ip4,
            map_names::PORT_IP4,
        )?;
        remove_set(
            &mut m.port_macs,
            &old.port_macs,
            &new.port_macs,
            map_names::PORT_MACS,
        )?;
        remove_trie_map(
            &mut m.sg_remote6,
            &old.sg_remote6,
            &new.sg_remote6,
            map_names::SG_REMOTE6,
        )?;
        remove_trie_map(
            &mut m.sg_remote4,
            &old.sg_remote4,
            &new.sg_remote4,
            map_names::SG_REMOTE4,
        )?;
        remove_trie_map(
            &mut m.sg_rules,
            &old.sg_rules,
            &new.sg_rules,
            map_names::SG_RULES,
        )?;
        Ok(())
    }

    /// Makes every map hold exactly `wanted`, whatever it holds now (changed, added or
    /// removed behind the agent's back, or not known): the maps that were wrong, with
    /// how many entries.
    pub fn repair(
        &mut self,
        wanted: &DatapathTables,
    ) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        let (m, t) = (self, wanted);
        macro_rules! repair {
            ($field:ident, $name:ident, hash) => {
                (
                    map_names::$name,
                    repair_hash(&mut m.$field, &t.$field, map_names::$name)?,
                )
            };
            ($field:ident, $name:ident, set) => {
                (
                    map_names::$name,
                    repair_hash(&mut m.$field, &as_set_map(&t.$field), map_names::$name)?,
                )
            };
            ($field:ident, $name:ident, trie) => {
                (
                    map_names::$name,
                    repair_trie(&mut m.$field, &t.$field, map_names::$name)?,
                )
            };
            ($field:ident, $name:ident, trie_set) => {
                (
                    map_names::$name,
                    repair_trie(&mut m.$field, &as_set_map(&t.$field), map_names::$name)?,
                )
            };
        }
        let drift = written_maps!(repair);
        Ok(drift.into_iter().filter(|(_, wrong)| *wrong > 0).collect())
    }

    /// Whether the maps hold exactly `wanted` (read back, entry by entry).
    pub fn holds(&self, wanted: &DatapathTables) -> Result<bool, DatapathError> {
        let (m, t) = (self, wanted);
        macro_rules! same {
            ($field:ident, $name:ident, hash) => {
                read_hash(&m.$field) == t.$field
            };
            ($field:ident, $name:ident, set) => {
                read_hash(&m.$field) == as_set_map(&t.$field)
            };
            ($field:ident, $name:ident, trie) => {
                read_trie(&m.$field) == t.$field
            };
            ($field:ident, $name:ident, trie_set) => {
                read_trie(&m.$field) == as_set_map(&t.$field)
            };
        }
        Ok(written_maps!(same).into_iter().all(|same| same))
    }
}

type MapResult = Result<(), DatapathError>;

pub(super) fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

fn upsert_map<K, V>(
    map: &mut HashMap<MapData, K, V>,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    name: &'static str,
) -> MapResult
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    for (key, value) in new {
        if old.get(key) != Some(value) {
            map.insert(key, value, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

fn remove_map<K, V>(
    map: &mut HashMap<MapData, K, V>,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    name: &'static str,
) -> MapResult
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    for key in old.keys().filter(|key| !new.contains_key(key)) {
        remove_present(map.remove(key), name)?;
    }
    Ok(())
}

fn upsert_set<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, u32>,
    old: &BTreeSet<K>,
    new: &BTreeSet<K>,
    name: &'static str,
) -> MapResult {
    for key in new.difference(old) {
        map.insert(key, 1, 0).map_err(map_err(name))?;
    }
    Ok(())
}

fn remove_set<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, u32>,
    old: &BTreeSet<K>,
    new: &BTreeSet<K>,
    name: &'static str,
) -> MapResult {
    for key in old.difference(new) {
        remove_present(map.remove(key), name)?;
    }
    Ok(())
}

fn upsert_trie<K: aya::Pod + Ord>(
    trie: &mut LpmTrie<MapData, K, u32>,
    old: &BTreeSet<(u32, K)>,
    new: &BTreeSet<(u32, K)>,
    name: &'static str,
) -> MapResult {
    for (prefix_len, data) in new.difference(old) {
        trie.insert(&LpmKey::new(*prefix_len, *data), 1, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

fn remove_trie<K: aya::Pod + Ord>(
    trie: &mut LpmTrie<MapData, K, u32>,
    old: &BTreeSet<(u32, K)>,
    new: &BTreeSet<(u32, K)>,
    name: &'static str,
) -> MapResult {
    for (prefix_len, data) in old.difference(new) {
        remove_present(trie.remove(&LpmKey::new(*prefix_len, *data)), name)?;
    }
    Ok(())
}

fn upsert_trie_map<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
    trie: &mut LpmTrie<MapData, K, V>,
    old: &BTreeMap<(u32, K), V>,
    new: &BTreeMap<(u32, K), V>,
    name: &'static str,
) -> MapResult {
    for ((prefix_len, data), value) in new {
        if old.get(&(*prefix_len, *data)) != Some(value) {
            trie.insert(&LpmKey::new(*prefix_len, *data), *value, 0)
                .map_err(map_err(name))?;
        }
    }
    Ok(())
}

fn remove_trie_map<K: aya::Pod + Ord, V: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, V>,
    old: &BTreeMap<(u32, K), V>,
    new: &BTreeMap<(u32, K), V>,
    name: &'static str,
) -> MapResult {
    for (prefix_len, data) in old.keys().filter(|key| !new.contains_key(key)) {
        remove_present(trie.remove(&LpmKey::new(*prefix_len, *data)), name)?;
    }
    Ok(())
}

/// A key set as the map the agent writes it into: each key with value 1.
fn as_set_map<K: Copy + Ord>(keys: &BTreeSet<K>) -> BTreeMap<K, u32> {
    keys.iter().map(|key| (*key, 1)).collect()
}

/// How many entries `actual` has wrong against `wanted`: different, missing or extra.
fn drift<K: Ord, V: PartialEq>(actual: &BTreeMap<K, V>, wanted: &BTreeMap<K, V>) -> u64 {
    let wrong = wanted
        .iter()
        .filter(|(k, v)| actual.get(k) != Some(v))
        .count();
    let extra = actual.keys().filter(|k| !wanted.contains_key(k)).count();
    (wrong + extra) as u64
}

/// Makes the hash map hold `wanted` exactly; how many entries it had wrong.
fn repair_hash<K, V>(
    map: &mut HashMap<MapData, K, V>,
    wanted: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<u64, DatapathError>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let actual = read_hash(map);
    let wrong = drift(&actual, wanted);
    if wrong > 0 {
        upsert_map(map, &actual, wanted, name)?;
        remove_map(map, &actual, wanted, name)?;
    }
    Ok(wrong)
}

/// As [`repair_hash`] for an LPM trie, keyed by (prefix length, data).
fn repair_trie<K, V>(
    trie: &mut LpmTrie<MapData, K, V>,
    wanted: &BTreeMap<(u32, K), V>,
    name: &'static str,
) -> Result<u64, DatapathError>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let actual = read_trie(trie);
    let wrong = drift(&actual, wanted);
    if wrong > 0 {
        upsert_trie_map(trie, &actual, wanted, name)?;
        remove_trie_map(trie, &actual, wanted, name)?;
    }
    Ok(wrong)
}

/// A removal of an entry that is already gone is what the caller wanted anyway.
fn remove_present(result: Result<(), MapError>, name: &'static str) -> MapResult {
    match result {
        Err(MapError::KeyNotFound) => {
            warn!(map = name, "entry to remove was already gone");
            Ok(())
        }
        other => other.map_err(map_err(name)),
    }
}

/// What a hash map holds. An entry removed while the walk runs is simply not there.
fn read_hash<K: aya::Pod + Ord, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> BTreeMap<K, V> {
    map.iter().filter_map(Result::ok).collect()
}

/// What an LPM trie holds, keyed by (prefix length, data).
fn read_trie<K: aya::Pod + Ord, V: aya::Pod>(
    trie: &LpmTrie<MapData, K, V>,
) -> BTreeMap<(u32, K), V> {
    trie.iter()
        .filter_map(Result::ok)
        .map(|(key, value)| ((key.prefix_len(), key.data()), value))
        .collect()
}
