//! Compiles `proto/` into Rust with no system `protoc`: protox parses the files into a descriptor set, which
//! tonic-prost-build turns into messages, clients and servers. The encoded descriptor set is also written to
//! OUT_DIR so the daemon can serve it through gRPC reflection and `rnctl` can print proto3 JSON.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/control.proto"];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("control_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(cfg!(feature = "daemon"))
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
