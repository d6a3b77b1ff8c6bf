//! The connector's allowlist and core: any allowlist text is a list or a named error (and
//! survives its own text form); whatever packets, name translations and routes a broker sends,
//! nothing reaches the site outside the list (the list itself is the oracle).
#![no_main]
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sekisho_proto::connector::{Allowlist, ConnectorState, LinkParams, Transmit};
use sekisho_proto::link::LinkId;

fuzz_target!(|data: &[u8]| {
    // First line: allowlist items, separated by spaces; the rest: operations.
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let Ok(head) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let items: Vec<&str> = head.split(' ').filter(|s| !s.is_empty()).collect();
    let Ok(allow) = Allowlist::parse(&items) else {
        return;
    };
    let text: Vec<String> = allow.clone().into();
    assert_eq!(Allowlist::parse(&text).as_ref(), Ok(&allow), "{text:?}");

    let t0 = Instant::now();
    let mut c = ConnectorState::new(t0, allow.clone());
    c.handle_link_up(
        LinkId(1),
        "b",
        LinkParams {
            device_ranges: vec!["100.118.0.0/16".parse().unwrap(), "0.0.0.0/1".parse().unwrap()],
            app_ranges: vec!["100.119.0.0/16".parse().unwrap()],
            max_datagram: 1400,
        },
    );
    let mut rest = &data[split.min(data.len())..];
    let mut now = t0;
    while let Some((&op, tail)) = rest.split_first() {
        let len = (op as usize & 0x7f).min(tail.len());
        let (chunk, next) = tail.split_at(len);
        rest = next;
        match op >> 7 {
            0 => c.handle_link_packet(LinkId(1), Bytes::copy_from_slice(chunk), now),
            _ => {
                // A name translation the broker asks for, resolved to an address from the
                // input: names are from a small set, addresses anything.
                let names = ["wiki.corp.example", "x.evil.example", "corp.example"];
                let name = names[chunk.first().copied().unwrap_or(0) as usize % names.len()];
                let syn = IpAddr::V4(Ipv4Addr::new(100, 119, 0, chunk.get(1).copied().unwrap_or(1)));
                let dev = IpAddr::V4(Ipv4Addr::new(100, 118, 0, 2));
                c.handle_map_name((dev, syn), name.to_string(), &[]);
                let real = Ipv4Addr::new(
                    chunk.get(2).copied().unwrap_or(10),
                    chunk.get(3).copied().unwrap_or(20),
                    chunk.get(4).copied().unwrap_or(0),
                    chunk.get(5).copied().unwrap_or(10),
                );
                let installed = allow.permits_name(name).is_ok();
                if installed {
                    c.handle_name_resolved((dev, syn), name.to_string(), Ok(real));
                }
            }
        }
        now += Duration::from_millis(10);
        c.handle_timeout(now);
        while let Some(t) = c.poll_transmit() {
            if let Transmit::Site(p) = t {
                // The kernel rewrites synthetic destinations to their translation; either way
                // the destination is checked: a packet to a synthetic address left only after
                // its (allowed) translation was installed.
                let (_, dst) = sekisho_proto::packet::addresses(&p).expect("a site packet parses");
                let synthetic = matches!(dst, IpAddr::V4(a) if a.octets()[..2] == [100, 119]);
                if !synthetic {
                    assert!(
                        allow.permits_packet(&p, None).is_ok(),
                        "a packet outside the allowlist reached the site: {p:?} with {text:?}"
                    );
                }
            }
        }
        while c.poll_event().is_some() {}
    }
});
