#[courier_rpc::service]
trait Names {
    async fn first(&self) -> Option<&'static str>;
}

fn main() {}
