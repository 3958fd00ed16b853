//! Map entries read, written and removed many to a system call (`BPF_MAP_*_BATCH`). A
//! commit at a large node's scale moves hundreds of thousands of entries; one call for
//! each was most of its time, and a drift check read every entry twice over.
//!
//! The kernel has these for the hash maps and LPM tries the agent writes (the tries
//! through its generic loop over the map's own update, delete and next-key operations).

use std::{
    io,
    mem::{size_of, zeroed},
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries a call: large enough that the calls cost nothing beside the entries, small
/// enough that the kernel's copy of them stays a few hundred kilobytes.
const CHUNK: usize = 8192;

/// `bpf_attr` for the batch commands. The kernel takes a shorter `bpf_attr` than its
/// own and reads the rest as zero.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const _: () = assert!(size_of::<BatchAttr>() == 56);

fn call(command: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size given, and every pointer
    // in it points at a buffer of `count` entries of the map's key or value size (or,
    // for the batch cursors, of at least the key size) that outlives the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes every `(key, value)`, added or replaced.
pub fn update<K: Pod, V: Pod>(map: BorrowedFd<'_>, entries: &[(K, V)]) -> io::Result<()> {
    let mut keys = Vec::with_capacity(entries.len().min(CHUNK));
    let mut values = Vec::with_capacity(entries.len().min(CHUNK));
    for chunk in entries.chunks(CHUNK) {
        keys.clear();
        values.clear();
        for (key, value) in chunk {
            keys.push(*key);
            values.push(*value);
        }
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        call(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// Removes every key of `keys`; returns how many were already gone.
pub fn delete<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let (mut rest, mut gone) = (keys, 0);
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(CHUNK)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match call(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => rest = &rest[chunk.len()..],
            // `count` says how many went before the missing one; go on after it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                gone += 1;
                rest = &rest[(attr.count as usize + 1).min(rest.len())..];
            }
            Err(e) => return Err(e),
        }
    }
    Ok(gone)
}

/// Every entry of the map, in the kernel's order.
pub fn read<K: Pod, V: Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    // SAFETY: `Pod` types are plain bytes, for which all zeros is a value.
    let (mut keys, mut values): (Vec<K>, Vec<V>) = unsafe {
        (
            (0..CHUNK).map(|_| zeroed()).collect(),
            (0..CHUNK).map(|_| zeroed()).collect(),
        )
    };
    // The cursor is a key for tries, a bucket number (4 bytes) for hash maps.
    let cursor_size = size_of::<K>().max(8);
    let (mut cursor_in, mut cursor_out) = (vec![0u8; cursor_size], vec![0u8; cursor_size]);
    let mut entries = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor_in.as_ptr() as u64 },
            out_batch: cursor_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = (attr.count as usize).min(CHUNK);
        match result {
            Ok(()) => {}
            // The last batch: `count` says what it holds.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                entries.extend(
                    keys[..got]
                        .iter()
                        .copied()
                        .zip(values[..got].iter().copied()),
                );
                return Ok(entries);
            }
            Err(e) => return Err(e),
        }
        entries.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        std::mem::swap(&mut cursor_in, &mut cursor_out);
        first = false;
    }
}
