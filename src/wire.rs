//! The generated gRPC types of `proto/vtox/v1`, and conversions from the library's own types.

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("vtox.v1");
}

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Prost's gRPC codec with 1 KiB starting buffers instead of 8 KiB. Each open stream keeps one
/// to encode and one to decode; a coordinator holds a session with every agent, so for 10,000
/// agents the default sizes alone are 160 MB, while a heartbeat or an assignment is one or two
/// KB (the buffers grow for a larger message, a status of thousands of agents, as needed).
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

const LEAN_BUFFERS: usize = 1024;
/// tonic's default: how much an encoder gathers before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(LEAN_BUFFERS, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(LEAN_BUFFERS, YIELD_THRESHOLD))
    }
}
use crate::plan::InstanceRange;

impl pb::RunState {
    /// The name users read in tables, JSON and reports.
    pub fn name(self) -> &'static str {
        match self {
            pb::RunState::Idle => "idle",
            pb::RunState::Running => "running",
            pb::RunState::Stopped => "stopped",
            pb::RunState::Finished => "finished",
            pb::RunState::Failed => "failed",
        }
    }

    /// The state a state file written before the enum existed stored as text.
    pub fn from_legacy(name: &str) -> pb::RunState {
        match name {
            "running" => pb::RunState::Running,
            "finished" => pb::RunState::Finished,
            "failed" => pb::RunState::Failed,
            "" | "idle" => pb::RunState::Idle,
            _ => pb::RunState::Stopped,
        }
    }
}

/// The field names of `message` in the compiled wire contract (build.rs writes its
/// descriptors), for the tests that check a table names every field.
#[cfg(test)]
pub(crate) fn proto_fields(message: &str) -> Vec<String> {
    use prost::Message as _;
    let bytes = include_bytes!(concat!(env!("OUT_DIR"), "/vtox_descriptors.bin"));
    let Ok(set) = prost_types::FileDescriptorSet::decode(&bytes[..]) else {
        return Vec::new();
    };
    set.file
        .iter()
        .flat_map(|f| &f.message_type)
        .find(|m| m.name() == message)
        .map(|m| m.field.iter().map(|f| f.name().to_string()).collect())
        .unwrap_or_default()
}

/// The wire protocol's major version; a coordinator refuses agents that speak another.
pub const PROTOCOL_MAJOR: u32 = 1;

impl From<&InstanceRange> for pb::InstanceSpec {
    fn from(i: &InstanceRange) -> Self {
        pb::InstanceSpec {
            index: i.index,
            first_vehicle: i.first_vehicle,
            vehicles: i.vehicles,
        }
    }
}

impl From<&pb::InstanceSpec> for InstanceRange {
    fn from(i: &pb::InstanceSpec) -> Self {
        InstanceRange {
            index: i.index,
            first_vehicle: i.first_vehicle,
            vehicles: i.vehicles,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_states_read_as_users_know_them_and_as_old_state_files_wrote_them() {
        for s in [
            pb::RunState::Idle,
            pb::RunState::Running,
            pb::RunState::Stopped,
            pb::RunState::Finished,
            pb::RunState::Failed,
        ] {
            assert_eq!(pb::RunState::from_legacy(s.name()), s);
        }
        assert_eq!(pb::RunStatus::default().state().name(), "idle");
        assert_eq!(pb::RunState::from_legacy("paused"), pb::RunState::Stopped);
    }

    #[test]
    fn instance_ranges_convert_both_ways() {
        let r = InstanceRange {
            index: 3,
            first_vehicle: 150,
            vehicles: 50,
        };
        let spec = pb::InstanceSpec::from(&r);
        assert_eq!(
            (spec.index, spec.first_vehicle, spec.vehicles),
            (3, 150, 50)
        );
        assert_eq!(InstanceRange::from(&spec), r);
    }
}
