#[courier_rpc::service]
trait Misplaced {
    async fn upload(&self, chunks: courier_rpc::Incoming<Vec<u8>>, name: String) -> u64;
}

#[courier_rpc::service]
trait Borrowed {
    async fn chat(
        &self,
        lines: courier_rpc::Incoming<&'static [u8]>,
        replies: courier_rpc::Items<String>,
    );
}

fn main() {}
