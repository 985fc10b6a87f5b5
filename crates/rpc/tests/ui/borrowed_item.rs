#[courier_rpc::service]
trait Lines {
    async fn lines(&self, path: String, items: courier_rpc::Items<&'static [u8]>);
}

fn main() {}
