#[courier_rpc::service]
trait Greeter {
    async fn greet(&self, name: &str) -> String;
}

fn main() {}
