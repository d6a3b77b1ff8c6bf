//! Counter groups: plain `u64` fields, summed across data-plane workers and listed by name for
//! the metrics endpoint, from one declaration.

/// Declares a struct of `u64` counters with doc comments. It derives `Default`, `Clone`,
/// `Serialize`, and gets `merge` (add another's counts) and `fields` (name, value) pairs.
#[macro_export]
macro_rules! counters {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* $field:ident,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: u64,)*
        }

        impl $name {
            /// Adds `other`'s counts to these.
            pub fn merge(&mut self, other: &Self) {
                $(self.$field += other.$field;)*
            }

            /// Every counter with its name, in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field),)*]
            }

            /// The sum of every counter.
            pub fn total(&self) -> u64 {
                0 $(+ self.$field)*
            }
        }
    };
}

counters! {
    /// Packets and bytes one way.
    pub struct Traffic {
        packets,
        bytes,
    }
}

impl Traffic {
    /// Counts one packet of `len` bytes.
    pub fn count(&mut self, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    counters! {
        /// Test group.
        pub struct Two {
            /// First.
            a,
            b,
        }
    }

    #[test]
    fn merge_and_list() {
        let mut x = Two { a: 1, b: 2 };
        x.merge(&Two { a: 10, b: 20 });
        assert_eq!(x.fields(), vec![("a", 11), ("b", 22)]);
        assert_eq!(x.total(), 33);
        let mut t = Traffic::default();
        t.count(100);
        t.count(50);
        assert_eq!((t.packets, t.bytes), (2, 150));
    }
}
