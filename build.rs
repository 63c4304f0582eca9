//! Compiles `proto/` into Rust with no system `protoc`: protox parses the files into descriptor sets, which
//! tonic-prost-build turns into messages, clients and servers.
//!
//! - `control.proto`: the gRPC control API. Its encoded descriptor set is also written to OUT_DIR so the daemon
//!   can serve it through gRPC reflection and `rnctl` can print proto3 JSON.
//! - `wire.proto`: the peer-to-peer messages (daemon only; kept out of the control API's descriptor set so
//!   reflection shows only the control API).

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let control = "proto/control.proto";
    println!("cargo:rerun-if-changed={control}");
    let descriptors = protox::compile([control], ["proto"])?;
    std::fs::write(out_dir.join("control_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(cfg!(feature = "daemon"))
        .build_client(true)
        .compile_fds(descriptors)?;

    let wire = "proto/wire.proto";
    println!("cargo:rerun-if-changed={wire}");
    if cfg!(feature = "daemon") {
        let descriptors = protox::compile([wire], ["proto"])?;
        tonic_prost_build::configure().build_server(false).build_client(false).compile_fds(descriptors)?;
    }
    Ok(())
}
